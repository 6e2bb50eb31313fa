//! Reading TOML documents (the config, policies, the rubric, the model registry) into their
//! typed structs, with each problem placed at its file, line and column.

use crate::domain::{Location, Problem, ProblemKind};

/// 1-based line of a byte offset, for `file:line` messages.
pub fn line_of(text: &str, offset: usize) -> usize {
    text.as_bytes()[..offset.min(text.len())]
        .iter()
        .filter(|&&b| b == b'\n')
        .count()
        + 1
}

/// A TOML syntax or shape error as a [`Problem`] at its line and column.
pub fn toml_error(text: &str, file: &str, e: &toml::de::Error) -> Problem {
    let at = match e.span() {
        Some(s) => {
            let start = s.start.min(text.len());
            let line_start = text
                .get(..start)
                .and_then(|t| t.rfind('\n'))
                .map_or(0, |i| i + 1);
            let column = text
                .get(line_start..start)
                .map_or(1, |t| t.chars().count() + 1);
            Location {
                file: file.to_string(),
                line: Some(line_of(text, start)),
                column: Some(column),
            }
        }
        None => Location::file(file),
    };
    let message = e.message().to_string();
    let kind = if message.starts_with("unknown field") {
        ProblemKind::UnknownField
    } else {
        ProblemKind::Syntax
    };
    at.problem(kind, message)
}

/// Reads `text` as a `T`, or says every problem serde meets in it, each at its line and
/// column, not only the first: the entry that holds a problem (an element of an array of
/// tables such as a `[[budget]]`, a table under a table such as `[pools.code]`, else the
/// top-level key) is taken out and the rest read again, until the rest reads or a problem
/// lies in no entry. A syntax error ends it, as nothing past it can be read; a key
/// reported missing only because its entry was taken out is not a problem of the file.
pub fn from_toml<T: serde::de::DeserializeOwned>(
    text: &str,
    file: &str,
) -> Result<T, Vec<Problem>> {
    let first = match toml::from_str::<T>(text) {
        Ok(t) => return Ok(t),
        Err(e) => e,
    };
    let mut problems = vec![toml_error(text, file, &first)];
    let Ok(mut table) = toml::de::DeTable::parse(text) else {
        return Err(problems);
    };
    let mut at = first.span();
    let mut taken = Vec::new();
    // Each round takes an entry out, so the entries bound the rounds; so does this.
    for _ in 0..MAX_TOML_PROBLEMS {
        let Some(span) = at else {
            break;
        };
        match take_out(table.get_mut(), span.start) {
            Some(key) => taken.push(key),
            None => break,
        }
        let e = match T::deserialize(toml::de::Deserializer::from(table.clone())) {
            Ok(_) => break,
            Err(e) => e,
        };
        let cause = e.message();
        if taken
            .iter()
            .any(|k| cause == format!("missing field `{k}`"))
        {
            break;
        }
        let p = toml_error(text, file, &e);
        if problems.contains(&p) {
            break;
        }
        problems.push(p);
        at = e.span();
    }
    // Found in the order the reader meets keys, which is not the file's.
    problems.sort();
    Err(problems)
}

/// Problems [`from_toml`] reports of one document at most.
const MAX_TOML_PROBLEMS: usize = 100;

/// Takes out of `table` the entry that holds the byte offset `pos` (see [`from_toml`]), and
/// gives its key. A table's span is its header alone, and its keys follow it, so the entry
/// is the one that starts last at or before `pos`.
fn take_out(table: &mut toml::de::DeTable<'_>, pos: usize) -> Option<String> {
    use toml::de::{DeArray, DeValue};
    /// Where an entry is: a top-level key, an element of its array, a table under it.
    enum Entry {
        Key(String),
        Item(String, usize),
        Nested(String, String),
    }
    let mut best: Option<(usize, Entry)> = None;
    let mut consider = |start: usize, entry: Entry| {
        if start <= pos && best.as_ref().is_none_or(|(b, _)| start >= *b) {
            best = Some((start, entry));
        }
    };
    for (k, v) in table.iter() {
        let key = k.get_ref().to_string();
        let start = k.span().start.min(v.span().start);
        match v.get_ref() {
            DeValue::Array(items) if !items.is_empty() => {
                for (i, item) in items.iter().enumerate() {
                    consider(item.span().start, Entry::Item(key.clone(), i));
                }
            }
            DeValue::Table(inner) => {
                let mut only_tables = true;
                for (k2, v2) in inner.iter() {
                    if matches!(v2.get_ref(), DeValue::Table(_)) {
                        let at = k2.span().start.min(v2.span().start);
                        consider(at, Entry::Nested(key.clone(), k2.get_ref().to_string()));
                    } else {
                        only_tables = false;
                    }
                }
                // `[pools.code]` alone names `pools` inside its header: not an entry.
                if !only_tables || inner.is_empty() {
                    consider(start, Entry::Key(key));
                }
            }
            _ => consider(start, Entry::Key(key)),
        }
    }
    match best?.1 {
        Entry::Key(key) => {
            table.remove(key.as_str());
            Some(key)
        }
        Entry::Item(key, i) => {
            if let Some(DeValue::Array(items)) = table.get_mut(key.as_str()).map(|v| v.get_mut()) {
                let mut kept = DeArray::new();
                for (j, item) in items.iter().enumerate() {
                    if j != i {
                        kept.push(item.clone());
                    }
                }
                *items = kept;
            }
            Some(key)
        }
        Entry::Nested(key, nested) => {
            if let Some(DeValue::Table(inner)) = table.get_mut(key.as_str()).map(|v| v.get_mut()) {
                inner.remove(nested.as_str());
            }
            Some(nested)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every entry's problem is said, each at its own line, not only the first; what is
    /// taken out to read on is not blamed for a missing key; a syntax error is said once.
    #[test]
    fn every_problem_of_a_toml_document_is_said_at_its_line() {
        #[derive(Debug, serde::Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Entry {
            name: String,
            #[serde(default)]
            limit: f64,
        }
        #[derive(Debug, serde::Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Doc {
            #[serde(default)]
            description: Option<String>,
            #[serde(default)]
            entry: Vec<Entry>,
            #[serde(default)]
            pools: std::collections::BTreeMap<String, Entry>,
            head: Entry,
        }
        let text = "description = 5\n\
                    [head]\nname = \"h\"\n\
                    [[entry]]\nname = \"a\"\ncolour = \"red\"\n\
                    [[entry]]\nname = \"b\"\n\
                    [[entry]]\nname = \"c\"\nlimit = \"high\"\n\
                    [pools.x]\nname = \"x\"\nsize = 3\n\
                    [pools.y]\nname = \"y\"\n\
                    [pools.z]\nlimit = 1.0\n";
        let problems = from_toml::<Doc>(text, "d.toml").unwrap_err();
        let said: Vec<String> = problems.iter().map(|p| p.to_string()).collect();
        let at = |prefix: &str, what: &str| {
            assert!(
                said.iter()
                    .any(|p| p.starts_with(prefix) && p.contains(what)),
                "{prefix} {what}: {said:#?}"
            )
        };
        at("d.toml:1:", "invalid type");
        at("d.toml:6:", "unknown field `colour`");
        at("d.toml:11:", "invalid type");
        at("d.toml:14:", "unknown field `size`");
        at("d.toml:17:", "missing field `name`");
        assert_eq!(said.len(), 5, "{said:#?}");
        // What is taken out is not missed: `head` at fault is said once, not as missing.
        let problems = from_toml::<Doc>("[head]\nname = 1\n", "d.toml").unwrap_err();
        assert_eq!(problems.len(), 1, "{problems:?}");
        // A syntax error: nothing past it can be read.
        let problems =
            from_toml::<Doc>("[head\nname = 1\n[[entry]]\nx = 1\n", "d.toml").unwrap_err();
        assert_eq!(problems.len(), 1, "{problems:?}");
        let doc = from_toml::<Doc>(
            "description = \"d\"\n[head]\nname = \"h\"\n[[entry]]\nname = \"a\"\nlimit = 2.0\n[pools.x]\nname = \"x\"\n",
            "d.toml",
        )
        .unwrap();
        assert_eq!(doc.description.as_deref(), Some("d"));
        assert_eq!((doc.head.name.as_str(), doc.head.limit), ("h", 0.0));
        assert_eq!((doc.entry[0].name.as_str(), doc.entry[0].limit), ("a", 2.0));
        assert_eq!(doc.pools["x"].name, "x");
    }
}
