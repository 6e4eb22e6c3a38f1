//! `docs/protocol.md` and the code must agree: a frame built byte by byte from the document's
//! header table is read back by the code, and every frame kind the document lists has the
//! number and name the code uses.

use migration::frame::{FrameReader, Kind, HEADER_LEN, MAGIC, MAX_PAYLOAD};

fn doc() -> String {
    std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/protocol.md")).unwrap()
}

/// The rows of the table whose header's first cell is `first_cell`.
fn rows<'a>(doc: &'a str, first_cell: &str) -> Vec<Vec<&'a str>> {
    doc.lines()
        .filter(|l| l.starts_with('|'))
        .map(|l| l.trim_matches('|').split('|').map(str::trim).collect::<Vec<_>>())
        .skip_while(|r| r.first() != Some(&first_cell))
        .skip(2)
        .take_while(|r| r.first().is_some_and(|c| c.parse::<u32>().is_ok()))
        .collect()
}

#[test]
fn a_frame_built_from_the_document_is_read_by_the_code() {
    let doc = doc();
    let header = rows(&doc, "offset");
    let field = |name: &str| -> (usize, usize) {
        let r = header
            .iter()
            .find(|r| {
                // A field's name is its description up to the first comma, colon or bracket.
                r[2].split([',', ':', '(']).next().map(str::trim) == Some(name)
            })
            .unwrap_or_else(|| panic!("no header field '{name}' in the document"));
        (r[0].parse().unwrap(), r[1].parse().unwrap_or(0))
    };
    // The magic as the document writes it.
    let magic_hex = doc
        .split("read as a little-endian u32 `0x")
        .nth(1)
        .and_then(|s| s.split('`').next())
        .expect("the document states the magic as a u32");
    let magic = u32::from_str_radix(magic_hex, 16).unwrap();
    assert_eq!(magic, MAGIC, "docs/protocol.md gives the magic {magic:#x}");
    assert_eq!(&magic.to_le_bytes(), b"LMIG");
    let (payload_at, _) = field("payload");
    assert_eq!(payload_at, HEADER_LEN);
    assert!(doc.contains(&format!("at most {} MiB", MAX_PAYLOAD >> 20)));

    // Build a DeviceData frame of 5 bytes, sequence 0, key 0 (a handshake frame's key).
    let payload = b"hello";
    let mut f = vec![0u8; payload_at];
    let (o, n) = field("magic");
    f[o..o + n].copy_from_slice(&magic.to_le_bytes());
    let (o, _) = field("kind");
    f[o] = 5;
    let (o, n) = field("payload length");
    f[o..o + n].copy_from_slice(&(payload.len() as u32).to_le_bytes());
    let (o, n) = field("sequence number");
    f[o..o + n].copy_from_slice(&0u64.to_le_bytes());
    let (o, n) = field("CRC32C of the session key");
    assert!(header
        .iter()
        .any(|r| r[2].contains("the session key (8 bytes), bytes 0–19 and the payload")));
    let crc = crc32c::crc32c_append(
        crc32c::crc32c_append(crc32c::crc32c(&0u64.to_le_bytes()), &f[..o]),
        payload,
    );
    f[o..o + n].copy_from_slice(&crc.to_le_bytes());
    f.extend_from_slice(payload);
    let got = FrameReader::new(&f[..]).read_frame().unwrap().unwrap();
    assert_eq!(
        (got.kind, got.seq, &got.payload[..]),
        (Kind::DeviceData, 0, &payload[..])
    );
}

#[test]
fn every_documented_kind_is_the_codes() {
    let doc = doc();
    let kinds = rows(&doc, "kind");
    assert_eq!(kinds.len(), 18, "{kinds:?}");
    for r in &kinds {
        let n: u8 = r[0].parse().unwrap();
        let k = Kind::from_u8(n).unwrap_or_else(|| panic!("kind {n} is not the code's"));
        assert_eq!(format!("{k:?}"), r[1], "kind {n}");
    }
    assert_eq!(Kind::from_u8(19), None, "the code has no undocumented kinds");
}
