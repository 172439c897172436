//! `openapi.yaml` and the router agree: every served route is documented
//! and every documented route is served, with the documented methods.

use std::collections::BTreeSet;

use crate::helpers::*;

fn spec_routes() -> BTreeSet<(String, String)> {
    let text = std::fs::read_to_string("openapi.yaml").unwrap();
    let doc: serde_yaml_ng::Value = serde_yaml_ng::from_str(&text).unwrap();
    let mut out = BTreeSet::new();
    for (path, item) in doc["paths"].as_mapping().expect("paths") {
        for (method, _) in item.as_mapping().unwrap() {
            let m = method.as_str().unwrap().to_ascii_uppercase();
            if ["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"].contains(&m.as_str()) {
                out.insert((m, path.as_str().unwrap().to_owned()));
            }
        }
    }
    out
}

#[test]
fn spec_and_router_list_the_same_routes() {
    let served: BTreeSet<(String, String)> = tokengate::app::routes().into_iter().collect();
    let documented = spec_routes();
    let undocumented: Vec<_> = served.difference(&documented).collect();
    let unserved: Vec<_> = documented.difference(&served).collect();
    assert!(undocumented.is_empty(), "served but not in openapi.yaml: {undocumented:?}");
    assert!(unserved.is_empty(), "in openapi.yaml but not served: {unserved:?}");
}

#[tokio::test]
async fn router_answers_exactly_the_listed_methods() {
    let app = spawn_app().await;
    for (path, methods, _) in tokengate::app::route_table() {
        let url = format!("{}{}", app.base, path.replace("{id}", "0123456789abcdef0123456789abcdef"));
        for method in ["GET", "POST", "PUT", "DELETE", "PATCH"] {
            let resp = app.client.request(method.parse().unwrap(), &url).send().await.unwrap();
            if methods.contains(&method) {
                assert!(resp.status() != 404 && resp.status() != 405, "{method} {path}: {}", resp.status());
            } else {
                assert_eq!(resp.status(), 405, "{method} {path}");
                // The dialects' routes answer in their own shape.
                let expected = tokengate::error::ErrorShape::for_path(path).content_type();
                assert_eq!(resp.headers()["content-type"], expected, "{method} {path}");
            }
        }
    }
    let resp = app.get("/nope", None).await;
    assert_eq!(resp.status(), 404);
    assert_eq!(resp.json::<serde_json::Value>().await.unwrap()["code"], "not_found");
}

#[tokio::test]
async fn the_served_spec_is_the_file() {
    let app = spawn_app().await;
    let resp = app.get("/openapi.yaml", None).await;
    assert_eq!(resp.status(), 200);
    assert!(resp.headers()["content-type"].to_str().unwrap().starts_with("application/yaml"));
    assert_eq!(resp.text().await.unwrap(), std::fs::read_to_string("openapi.yaml").unwrap());
}
