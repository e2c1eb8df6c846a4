//! A small JSON Schema validator for the subset docs/json/*.json use: `type` (one or a list),
//! `enum`, `pattern` (only `^[0-9a-f]+$`), `properties`, `required`, `additionalProperties`
//! (a boolean), `items`, `anyOf`, and `$ref` to `#/$defs/..` or another file in docs/json
//! (optionally with a `#/$defs/..` pointer). An unknown keyword fails, so a schema cannot
//! silently use more than is checked.

use std::path::PathBuf;

use serde_json::Value;

const KNOWN: &[&str] = &[
    "$schema",
    "$id",
    "title",
    "description",
    "$defs",
    "type",
    "enum",
    "pattern",
    "properties",
    "required",
    "additionalProperties",
    "items",
    "anyOf",
    "$ref",
];

fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../docs/json")
}

/// Loads docs/json/`name`.
pub fn load(name: &str) -> Value {
    let path = dir().join(name);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path:?}: {e}"));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{path:?}: {e}"))
}

/// Whether `v` matches docs/json/`name`, with the reason when it does not.
pub fn check_against(name: &str, v: &Value) -> Result<(), String> {
    let root = load(name);
    check(&root, &root, v, "$")
}

/// Panics with the path and reason when `v` does not match docs/json/`name`.
pub fn assert_valid(name: &str, v: &Value) {
    if let Err(e) = check_against(name, v) {
        panic!(
            "output does not match docs/json/{name}: {e}\n{}",
            serde_json::to_string_pretty(v).unwrap()
        );
    }
}

fn type_ok(t: &str, v: &Value) -> bool {
    match t {
        "object" => v.is_object(),
        "array" => v.is_array(),
        "string" => v.is_string(),
        "integer" => v.is_u64() || v.is_i64(),
        "number" => v.is_number(),
        "boolean" => v.is_boolean(),
        "null" => v.is_null(),
        other => panic!("unknown type {other}"),
    }
}

fn resolve(root: &Value, r: &str) -> (Value, Value) {
    let (file, pointer) = r.split_once('#').unwrap_or((r, ""));
    let doc = if file.is_empty() {
        root.clone()
    } else {
        load(file)
    };
    let target = doc
        .pointer(pointer)
        .unwrap_or_else(|| panic!("$ref {r} does not resolve"))
        .clone();
    (doc, target)
}

fn check(root: &Value, schema: &Value, v: &Value, at: &str) -> Result<(), String> {
    let s = schema.as_object().expect("a schema is an object");
    for k in s.keys() {
        assert!(KNOWN.contains(&k.as_str()), "unsupported keyword {k}");
    }
    if let Some(r) = s.get("$ref").and_then(Value::as_str) {
        let (doc, target) = resolve(root, r);
        check(&doc, &target, v, at)?;
    }
    if let Some(t) = s.get("type") {
        let ok = match t {
            Value::String(t) => type_ok(t, v),
            Value::Array(ts) => ts.iter().any(|t| type_ok(t.as_str().unwrap(), v)),
            _ => panic!("bad type"),
        };
        if !ok {
            return Err(format!("{at}: {v} is not of type {t}"));
        }
    }
    if let Some(e) = s.get("enum").and_then(Value::as_array) {
        if !e.contains(v) {
            return Err(format!("{at}: {v} is not one of {e:?}"));
        }
    }
    if let Some(p) = s.get("pattern").and_then(Value::as_str) {
        assert_eq!(p, "^[0-9a-f]+$", "only the hex pattern is supported");
        let text = v.as_str().unwrap_or_default();
        if text.is_empty()
            || !text
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        {
            return Err(format!("{at}: {v} is not lowercase hex"));
        }
    }
    if let Some(any) = s.get("anyOf").and_then(Value::as_array) {
        let errs: Vec<String> = any
            .iter()
            .filter_map(|sub| check(root, sub, v, at).err())
            .collect();
        if errs.len() == any.len() {
            return Err(format!(
                "{at}: matches none of anyOf: [{}]",
                errs.join(" | ")
            ));
        }
    }
    if let (Some(items), Some(arr)) = (s.get("items"), v.as_array()) {
        for (i, x) in arr.iter().enumerate() {
            check(root, items, x, &format!("{at}[{i}]"))?;
        }
    }
    if let Some(obj) = v.as_object() {
        let props = s.get("properties").and_then(Value::as_object);
        for r in s
            .get("required")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            let r = r.as_str().unwrap();
            if !obj.contains_key(r) {
                return Err(format!("{at}: missing {r}"));
            }
        }
        for (k, x) in obj {
            match props.and_then(|p| p.get(k)) {
                Some(sub) => check(root, sub, x, &format!("{at}.{k}"))?,
                None if s.get("additionalProperties") == Some(&Value::Bool(false)) => {
                    return Err(format!("{at}: unexpected key {k}"))
                }
                None => {}
            }
        }
    }
    Ok(())
}

/// Every object key in `v` (recursively) is kebab-case: lowercase, digits and `-`. Values
/// under `skip` keys (free-form format details) are not walked.
pub fn assert_kebab(v: &Value, skip: &[&str]) {
    match v {
        Value::Object(m) => {
            for (k, x) in m {
                assert!(
                    k.bytes()
                        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-'),
                    "key {k:?} is not kebab-case"
                );
                if !skip.contains(&k.as_str()) {
                    assert_kebab(x, skip);
                }
            }
        }
        Value::Array(a) => a.iter().for_each(|x| assert_kebab(x, skip)),
        _ => {}
    }
}
