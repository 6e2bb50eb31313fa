//! LZ4 blocks for the stored formats that compress (the decision log's pages, kept
//! traces): a caller's header, then the block. Each format writes its own header (its
//! version byte, the raw length, what else it needs); the block and the bound on what a
//! damaged header may claim are the same for all.

/// LZ4 expands a block by at most about 255 times: a header that claims more over its
/// block's length is damaged, and is refused before the claim is allocated.
const MAX_RATIO: usize = 255;

/// `header_len` zero bytes for the caller's header, then `raw` as an LZ4 block.
pub fn compress(header_len: usize, raw: &[u8]) -> Result<Vec<u8>, String> {
    let mut out = vec![0; header_len + lz4_flex::block::get_maximum_output_size(raw.len())];
    let written =
        lz4_flex::block::compress_into(raw, &mut out[header_len..]).map_err(|e| e.to_string())?;
    out.truncate(header_len + written);
    Ok(out)
}

/// `block` decompressed, its header having claimed `raw_len` bytes.
pub fn decompress(block: &[u8], raw_len: usize) -> Result<Vec<u8>, String> {
    if raw_len > block.len().saturating_mul(MAX_RATIO).max(64) {
        return Err(format!(
            "claims {raw_len} bytes from a block of {}",
            block.len()
        ));
    }
    lz4_flex::block::decompress(block, raw_len).map_err(|e| format!("does not decompress: {e}"))
}
