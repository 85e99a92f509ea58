//! Proves the compiled protos match `opamp-v1-fields.md` (copied from shared/reference): every
//! message field number and type, and every enum value, in both directions.

use std::collections::BTreeSet;

use prost::Message;
use prost_types::field_descriptor_proto::{Label, Type};
use prost_types::FileDescriptorSet;

const TABLE: &str = include_str!("../opamp-v1-fields.md");
const FDS: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/opamp.fds"));

fn type_name(f: &prost_types::FieldDescriptorProto, maps: &BTreeSet<String>) -> String {
    let short = |n: &str| n.rsplit('.').next().unwrap_or(n).to_string();
    let base = match f.r#type() {
        Type::Message | Type::Enum => short(f.type_name()),
        Type::Bytes => "bytes".into(),
        Type::String => "string".into(),
        Type::Uint64 => "uint64".into(),
        Type::Int64 => "int64".into(),
        Type::Fixed64 => "fixed64".into(),
        Type::Bool => "bool".into(),
        Type::Double => "double".into(),
        other => format!("{other:?}").to_lowercase(),
    };
    if f.label() == Label::Repeated {
        if maps.contains(f.type_name()) {
            return "map".into();
        }
        return format!("repeated {base}");
    }
    base
}

#[test]
fn fields_and_enums_match_the_reference_table() {
    let fds = FileDescriptorSet::decode(FDS).expect("descriptor set");
    let mut ours_fields = BTreeSet::new();
    let mut ours_enums = BTreeSet::new();
    for file in &fds.file {
        let pkg = file.package();
        assert_eq!(pkg, "opamp.proto.v1");
        for e in &file.enum_type {
            for v in &e.value {
                ours_enums.insert((e.name().to_string(), v.name().to_string(), v.number()));
            }
        }
        for m in &file.message_type {
            let maps: BTreeSet<String> = m
                .nested_type
                .iter()
                .filter(|n| n.options.as_ref().is_some_and(|o| o.map_entry()))
                .map(|n| format!(".{pkg}.{}.{}", m.name(), n.name()))
                .collect();
            for f in &m.field {
                ours_fields.insert((
                    m.name().to_string(),
                    f.number(),
                    f.name().to_string(),
                    type_name(f, &maps),
                ));
            }
        }
    }

    let mut table_fields = BTreeSet::new();
    let mut table_enums = BTreeSet::new();
    for line in TABLE.lines() {
        let cells: Vec<&str> = line.split('|').map(str::trim).collect();
        if cells.len() < 5 || cells[1].is_empty() || cells[1] == "Message" || cells[1] == "Enum" {
            continue;
        }
        if cells[1].starts_with("---") {
            continue;
        }
        if let Ok(num) = cells[2].parse::<i32>() {
            let ty = if cells[4].starts_with("map<") {
                "map".to_string()
            } else {
                cells[4].to_string()
            };
            table_fields.insert((cells[1].to_string(), num, cells[3].to_string(), ty));
        } else if cells[2] != "–" && cells[3].contains("(0x") {
            let num: i32 = cells[3]
                .split_whitespace()
                .next()
                .and_then(|n| n.parse().ok())
                .expect("enum number");
            table_enums.insert((cells[1].to_string(), cells[2].to_string(), num));
        }
    }
    assert!(
        table_fields.len() > 100,
        "table parse found {} fields",
        table_fields.len()
    );
    assert!(
        table_enums.len() > 40,
        "table parse found {} enum values",
        table_enums.len()
    );
    let missing: Vec<_> = table_fields.difference(&ours_fields).collect();
    let extra: Vec<_> = ours_fields.difference(&table_fields).collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "fields differ\n missing: {missing:#?}\n extra: {extra:#?}"
    );
    let missing: Vec<_> = table_enums.difference(&ours_enums).collect();
    let extra: Vec<_> = ours_enums.difference(&table_enums).collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "enums differ\n missing: {missing:#?}\n extra: {extra:#?}"
    );
}

/// Bytes a third-party client put on the wire (hand-assembled from the spec's field numbers)
/// decode into the fields they name.
#[test]
fn decodes_hand_assembled_agent_message() {
    let mut b = vec![0x0a, 16];
    b.extend([0xab; 16]); // 1: instance_uid
    b.extend([0x10, 0x05]); // 2: sequence_num = 5
    b.extend([0x20, 0x87, 0x70]); // 4: capabilities = 0x3807
    b.extend([0x4a, 0x00]); // 9: agent_disconnect {}
    b.extend([0x50, 0x01]); // 10: flags = RequestInstanceUid
    let m = flotilla_proto::AgentToServer::decode(&b[..]).unwrap();
    assert_eq!(m.instance_uid, vec![0xab; 16]);
    assert_eq!(m.sequence_num, 5);
    assert_eq!(m.capabilities, 0x3807);
    assert!(m.agent_disconnect.is_some());
    assert_eq!(m.flags, 1);
    // ServerToAgent{command: Restart} is the empty sub-message 4A 00.
    let s = flotilla_proto::ServerToAgent {
        command: Some(flotilla_proto::ServerToAgentCommand { r#type: 0 }),
        ..Default::default()
    };
    assert_eq!(s.encode_to_vec(), vec![0x4a, 0x00]);
}
