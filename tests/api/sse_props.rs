//! The SSE encoder against the spec parser: arbitrary strings, fed to the
//! parser in arbitrary byte chunks, come back as the spec says.

use bytes::BytesMut;
use proptest::prelude::*;
use tokengate::sse::{Event, Parser, push_comment, push_event, push_json_string, push_retry};

fn parse_in_chunks(bytes: &[u8], cuts: &[usize]) -> Vec<Event> {
    let mut parser = Parser::new();
    let mut out = Vec::new();
    let mut bounds: Vec<usize> = cuts.iter().map(|c| c % (bytes.len() + 1)).collect();
    bounds.sort_unstable();
    let mut prev = 0;
    for b in bounds.into_iter().chain([bytes.len()]) {
        out.extend(parser.feed(&bytes[prev..b]));
        prev = b;
    }
    out
}

/// What a spec parser must give back for `data`: line ends become LF.
fn normalized(data: &str) -> String {
    data.replace("\r\n", "\n").replace('\r', "\n")
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn events_round_trip(
        data in "\\PC*|[a\r\n: ]{0,12}",
        event in "[a-z_]{1,10}",
        id in "[^\r\n\u{0}]{0,20}",
        cuts in proptest::collection::vec(any::<usize>(), 0..6),
    ) {
        let mut buf = BytesMut::new();
        push_retry(&mut buf, 1234);
        push_comment(&mut buf, "keep-alive");
        push_event(&mut buf, Some(&id), Some(&event), &data);
        push_event(&mut buf, None, None, "second");
        let events = parse_in_chunks(&buf, &cuts);
        prop_assert_eq!(events, vec![
            Event::Retry(1234),
            Event::Comment("keep-alive".into()),
            Event::Message { event: event.clone(), data: normalized(&data), id: Some(id.clone()) },
            Event::Message { event: "message".into(), data: "second".into(), id: Some(id.clone()) },
        ]);
    }

    #[test]
    fn field_values_cannot_inject_fields(event in "\\PC*", id in "\\PC*", raw in "[a-z\r\n:]{0,20}") {
        let event = format!("{event}{raw}");
        let id = format!("{id}{raw}\0");
        let mut buf = BytesMut::new();
        push_event(&mut buf, Some(&id), Some(&event), "payload");
        let events = Parser::new().feed(&buf);
        let strip = |s: &str, nul: bool| s.chars().filter(|c| *c != '\r' && *c != '\n' && !(nul && *c == '\0')).collect::<String>();
        let expected_event = strip(&event, false);
        prop_assert_eq!(events, vec![Event::Message {
            event: if expected_event.is_empty() { "message".into() } else { expected_event },
            data: "payload".into(),
            id: Some(strip(&id, true)),
        }]);
    }

    #[test]
    fn json_payloads_keep_exact_text(text in "\\PC*|[\u{0}-\u{1f}\"\\\\]{0,10}", cuts in proptest::collection::vec(any::<usize>(), 0..6)) {
        let mut json = BytesMut::new();
        json.extend_from_slice(b"{\"text\":");
        push_json_string(&mut json, &text);
        json.extend_from_slice(b"}");
        let json = std::str::from_utf8(&json).unwrap().to_owned();
        let mut buf = BytesMut::new();
        push_event(&mut buf, Some("s.1"), Some("delta"), &json);
        let events = parse_in_chunks(&buf, &cuts);
        let Event::Message { data, .. } = &events[0] else { panic!("{events:?}") };
        let value: serde_json::Value = serde_json::from_str(data).unwrap();
        prop_assert_eq!(value["text"].as_str().unwrap(), text.as_str());
    }
}
