//! The Unicode round trip through real HTTP: a generator that cuts its
//! chunks inside grapheme clusters, and deltas that must each be exactly one
//! cluster and concatenate back to the input byte for byte.

use std::time::Duration;

use proptest::prelude::*;
use serde_json::json;
use unicode_segmentation::UnicodeSegmentation;

use crate::helpers::*;

async fn round_trip(app: &TestApp, text: &str) -> Vec<String> {
    let resp = app
        .client
        .post(format!("{}/v1/stream", app.base))
        .bearer_auth(app.token("alice", "stream"))
        .json(&json!({"generator": "choppy", "prompt": text}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let events = read_events(resp, Duration::from_secs(10)).await;
    let deltas: Vec<String> = messages(&events)
        .into_iter()
        .filter(|(e, _, _)| e == "delta")
        .map(|(_, d, _)| d["text"].as_str().unwrap().to_owned())
        .collect();
    let done = messages(&events).pop().unwrap();
    assert_eq!(done.0, "done");
    assert_eq!(done.1["chars"], deltas.len());
    deltas
}

fn check(text: &str, deltas: &[String]) {
    let expected: Vec<&str> = text.graphemes(true).collect();
    assert_eq!(deltas.concat().as_bytes(), text.as_bytes(), "concatenation differs for {text:?}");
    assert_eq!(deltas, expected.as_slice(), "cluster split differs for {text:?}");
}

#[tokio::test]
async fn tricky_texts_survive_byte_for_byte() {
    let app = spawn_app().await;
    let corpus = [
        "你好，世界！这是中文。",
        "family 👨\u{200D}👩\u{200D}👧\u{200D}👦 and 🏳\u{FE0F}\u{200D}🌈 and 🧑🏿\u{200D}💻",
        "flags 🇯🇵🇺🇸🇫🇷🇩🇪 odd 🇬",
        "combining e\u{301} a\u{30A} Z\u{324}\u{354}\u{367}\u{311} क्षि 한\u{1100}\u{1161}\u{11A8}",
        "line\nbreaks\r\nand\rlone CR\r\n\r\n",
        "controls \u{1}\u{7}\u{8}\t\u{b}\u{c}\u{1b}[0m\u{7f} and quotes \" \\ '",
        "keycap 1\u{FE0F}\u{20E3} skin 👍🏽 zwj-end \u{200D}",
        "\u{FEFF}BOM first, U+2028\u{2028}U+2029\u{2029} end",
        "data: not a field\n\nid: nope\nevent: x\n: comment",
    ];
    for text in corpus {
        let deltas = round_trip(&app, text).await;
        check(text, &deltas);
    }
}

#[test]
fn arbitrary_texts_survive_byte_for_byte() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let app = rt.block_on(spawn_app());
    let config = ProptestConfig { cases: 48, ..ProptestConfig::default() };
    proptest!(config, |(text in "[^\u{0}]{1,60}|[a\u{300}-\u{36f}\u{1F1E6}-\u{1F1FF}\u{200D}\u{1F466}-\u{1F469}\u{FE0F}\r\n]{1,60}")| {
        let deltas = rt.block_on(round_trip(&app, &text));
        check(&text, &deltas);
    });
}
