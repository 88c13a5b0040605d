//! Device files for `dmdctl devices import`: CSV with a header row naming the six fields (any order), or a
//! JSON array of objects with the same fields. Errors name the line (CSV) or the index (JSON) and the
//! field, never a value: the values are secrets.

use dm_proto::admin::v1::DeviceRecord;

/// The fields of a record, as the header row and JSON objects name them.
pub const FIELDS: [&str; 6] = [
    "dev_id",
    "server_secret",
    "server_nonce_b64",
    "client_name",
    "client_secret",
    "client_nonce_b64",
];

/// One record and where it came from (`line 3`, `item 0`), for messages.
#[derive(Debug, Clone)]
pub struct Located {
    pub at: String,
    pub record: DeviceRecord,
}

fn set(record: &mut DeviceRecord, field: &str, value: String) {
    match field {
        "dev_id" => record.dev_id = value,
        "server_secret" => record.server_secret = value,
        "server_nonce_b64" => record.server_nonce_b64 = value,
        "client_name" => record.client_name = value,
        "client_secret" => record.client_secret = value,
        "client_nonce_b64" => record.client_nonce_b64 = value,
        _ => {}
    }
}

/// The records of a file, by its name's extension (`.json`, otherwise CSV).
pub fn parse(name: &str, text: &str) -> Result<Vec<Located>, String> {
    if name.to_ascii_lowercase().ends_with(".json") {
        parse_json(text)
    } else {
        parse_csv(text)
    }
}

pub fn parse_json(text: &str) -> Result<Vec<Located>, String> {
    let value: serde_json::Value =
        serde_json::from_str(text).map_err(|e| format!("not JSON: {e}"))?;
    let items = value
        .as_array()
        .ok_or("expected a JSON array of device objects")?;
    let mut out = Vec::with_capacity(items.len());
    for (i, item) in items.iter().enumerate() {
        let object = item
            .as_object()
            .ok_or_else(|| format!("item {i}: not an object"))?;
        let mut record = DeviceRecord::default();
        for (key, value) in object {
            if !FIELDS.contains(&key.as_str()) {
                return Err(format!(
                    "item {i}: unknown field '{key}' (fields: {})",
                    FIELDS.join(", ")
                ));
            }
            let text = value
                .as_str()
                .ok_or_else(|| format!("item {i}: {key} is not a string"))?;
            set(&mut record, key, text.to_string());
        }
        for field in FIELDS {
            if !object.contains_key(field) {
                return Err(format!("item {i}: {field} is missing"));
            }
        }
        out.push(Located {
            at: format!("item {i}"),
            record,
        });
    }
    Ok(out)
}

/// One CSV line's fields (RFC 4180 quoting: `"a,b"`, `""` for a quote inside quotes).
fn csv_fields(line: &str) -> Result<Vec<String>, String> {
    let mut fields = Vec::new();
    let mut field = String::new();
    let mut chars = line.chars().peekable();
    let mut quoted = false;
    let mut was_quoted = false;
    while let Some(c) = chars.next() {
        match (quoted, c) {
            (true, '"') if chars.peek() == Some(&'"') => {
                chars.next();
                field.push('"');
            }
            (true, '"') => quoted = false,
            (true, c) => field.push(c),
            (false, '"') if field.is_empty() && !was_quoted => {
                quoted = true;
                was_quoted = true;
            }
            (false, ',') => {
                fields.push(std::mem::take(&mut field));
                was_quoted = false;
            }
            (false, '"') => return Err("a quote inside an unquoted field".into()),
            (false, c) if was_quoted => {
                return Err(format!("'{c}' after a closing quote"));
            }
            (false, c) => field.push(c),
        }
    }
    if quoted {
        return Err("a quoted field is not closed".into());
    }
    fields.push(field);
    Ok(fields)
}

pub fn parse_csv(text: &str) -> Result<Vec<Located>, String> {
    let mut lines = text
        .lines()
        .enumerate()
        .map(|(i, l)| (i + 1, l.trim_end_matches('\r')))
        .filter(|(_, l)| !l.trim().is_empty());
    let (header_line, header) = lines.next().ok_or("the file is empty")?;
    let columns: Vec<String> = csv_fields(header)
        .map_err(|e| format!("line {header_line}: {e}"))?
        .into_iter()
        .map(|c| c.trim().to_string())
        .collect();
    for c in &columns {
        if !FIELDS.contains(&c.as_str()) {
            return Err(format!(
                "line {header_line}: unknown column '{c}' (the header names: {})",
                FIELDS.join(", ")
            ));
        }
    }
    for field in FIELDS {
        match columns.iter().filter(|c| *c == field).count() {
            0 => return Err(format!("line {header_line}: the column {field} is missing")),
            1 => {}
            _ => return Err(format!("line {header_line}: the column {field} is twice")),
        }
    }
    let mut out = Vec::new();
    for (n, line) in lines {
        let values = csv_fields(line).map_err(|e| format!("line {n}: {e}"))?;
        if values.len() != columns.len() {
            return Err(format!(
                "line {n}: {} fields, the header has {}",
                values.len(),
                columns.len()
            ));
        }
        let mut record = DeviceRecord::default();
        for (column, value) in columns.iter().zip(values) {
            set(&mut record, column, value);
        }
        out.push(Located {
            at: format!("line {n}"),
            record,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn csv_with_columns_in_any_order_and_quotes() {
        let text = "client_name,dev_id,server_secret,server_nonce_b64,client_secret,client_nonce_b64\r\n\
                    IMEI:1,IMEI:1,\"a,b\"\"c\",bm9uY2U=,s2,bm9uY2U=\n\n";
        let r = parse("devices.csv", text).unwrap();
        assert_eq!(r.len(), 1);
        assert_eq!(r[0].at, "line 2");
        assert_eq!(r[0].record.dev_id, "IMEI:1");
        assert_eq!(r[0].record.server_secret, "a,b\"c");
        assert_eq!(r[0].record.client_secret, "s2");
    }

    #[test]
    fn csv_errors_name_the_line_never_the_value() {
        let header = FIELDS.join(",");
        let e = parse_csv(&format!("{header}\nIMEI:1,only-secret\n")).unwrap_err();
        assert!(e.starts_with("line 2: 2 fields"), "{e}");
        assert!(!e.contains("only-secret"));
        let e = parse_csv("dev_id,password\n").unwrap_err();
        assert!(e.contains("unknown column 'password'"), "{e}");
        let e = parse_csv(&format!("{header}\n\"unclosed,a,b,c,d,e\n")).unwrap_err();
        assert!(e.starts_with("line 2:"), "{e}");
    }

    #[test]
    fn json_array_of_objects() {
        let text = r#"[{"dev_id":"IMEI:1","server_secret":"s","server_nonce_b64":"bg==",
            "client_name":"c","client_secret":"cs","client_nonce_b64":"bg=="}]"#;
        let r = parse("x.JSON", text).unwrap();
        assert_eq!(r[0].record.client_secret, "cs");
        let e = parse_json(r#"[{"dev_id":"IMEI:1"}]"#).unwrap_err();
        assert_eq!(e, "item 0: server_secret is missing");
        let e = parse_json(r#"{"dev_id":"IMEI:1"}"#).unwrap_err();
        assert!(e.contains("array"), "{e}");
    }
}
