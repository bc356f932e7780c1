//! The OpenAPI document served at `/admin/openapi.json` stays in step with the
//! REST routes and is internally consistent. No server is started.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "integration tests: helpers outside #[test] fail the test by panicking"
)]

use aigw_control_plane::admin::rest::OPENAPI;
use serde_json::Value;
use std::collections::BTreeSet;

const COLLECTIONS: [&str; 5] = [
    "provider_keys",
    "models",
    "apikeys",
    "api_keys",
    "jwt_providers",
];

/// Every route and method `rest::router` serves (the fallbacks aside).
fn expected_routes() -> BTreeSet<(String, String)> {
    let mut routes: BTreeSet<(String, String)> = [
        ("/livez", "get"),
        ("/readyz", "get"),
        ("/admin/openapi.json", "get"),
        ("/admin/v1/events", "get"),
        ("/admin/v1/nodes", "get"),
        ("/admin/v1/nodes", "post"),
        ("/admin/v1/nodes/{id}", "get"),
        ("/admin/v1/nodes/{id}", "delete"),
        ("/admin/v1/nodes/{id}/credentials/{credential_id}", "delete"),
        ("/admin/v1/usage", "get"),
        ("/admin/v1/models/{id}/cache", "delete"),
    ]
    .into_iter()
    .map(|(p, m)| (p.to_string(), m.to_string()))
    .collect();
    for c in COLLECTIONS {
        for m in ["get", "post"] {
            routes.insert((format!("/admin/v1/{c}"), m.to_string()));
        }
        for m in ["get", "put", "delete"] {
            routes.insert((format!("/admin/v1/{c}/{{id}}"), m.to_string()));
        }
    }
    routes
}

fn doc() -> Value {
    serde_json::from_str(OPENAPI).expect("openapi.json is valid JSON")
}

fn collect_refs<'a>(v: &'a Value, out: &mut Vec<&'a str>) {
    match v {
        Value::Object(map) => {
            for (k, v) in map {
                if k == "$ref" {
                    out.push(v.as_str().expect("$ref is a string"));
                } else {
                    collect_refs(v, out);
                }
            }
        }
        Value::Array(items) => items.iter().for_each(|v| collect_refs(v, out)),
        _ => {}
    }
}

const HTTP_METHODS: [&str; 8] = [
    "get", "put", "post", "delete", "options", "head", "patch", "trace",
];

#[test]
fn version_is_openapi_3() {
    let doc = doc();
    let version = doc["openapi"].as_str().expect("openapi field");
    assert!(version.starts_with("3."), "openapi version {version}");
    assert!(doc["info"]["title"].is_string());
    assert!(doc["info"]["version"].is_string());
}

#[test]
fn every_route_is_documented_and_nothing_else() {
    let doc = doc();
    let paths = doc["paths"].as_object().expect("paths object");
    let mut documented = BTreeSet::new();
    for (path, item) in paths {
        let item = item.as_object().expect("path item object");
        for method in item.keys().filter(|k| HTTP_METHODS.contains(&k.as_str())) {
            documented.insert((path.clone(), method.clone()));
        }
    }
    let expected = expected_routes();
    let missing: Vec<_> = expected.difference(&documented).collect();
    let extra: Vec<_> = documented.difference(&expected).collect();
    assert!(
        missing.is_empty(),
        "routes missing from openapi.json: {missing:?}"
    );
    assert!(
        extra.is_empty(),
        "openapi.json documents routes the router lacks: {extra:?}"
    );
}

#[test]
fn every_ref_resolves() {
    let doc = doc();
    let mut refs = Vec::new();
    collect_refs(&doc, &mut refs);
    assert!(!refs.is_empty());
    for r in refs {
        let pointer = r
            .strip_prefix('#')
            .unwrap_or_else(|| panic!("{r}: only local references are expected"));
        assert!(pointer.starts_with("/components/"), "{r}: not a component");
        let target = doc
            .pointer(pointer)
            .unwrap_or_else(|| panic!("{r}: points nowhere"));
        assert!(target.is_object(), "{r}: not an object");
        if let Some(name) = pointer.strip_prefix("/components/schemas/") {
            assert!(!name.contains('/'), "{r}: not a whole schema");
        }
    }
}

#[test]
fn components_cover_the_resources() {
    let doc = doc();
    let schemas = doc["components"]["schemas"]
        .as_object()
        .expect("component schemas");
    for name in [
        "ProviderKey",
        "Model",
        "Target",
        "Routing",
        "RateLimit",
        "Cost",
        "Cache",
        "ApiKey",
        "Budget",
        "ProviderKeyRecord",
        "ModelRecord",
        "ApiKeyRecord",
        "ProviderKeyList",
        "ModelList",
        "ApiKeyList",
        "JwtProvider",
        "ClaimMappings",
        "JwtProviderRecord",
        "JwtProviderList",
        "Deleted",
        "Event",
        "EventList",
        "Node",
        "NodeList",
        "UsageReport",
        "Error",
    ] {
        assert!(
            schemas.contains_key(name),
            "components.schemas.{name} missing"
        );
    }
    // Resource values are `deny_unknown_fields` on the server.
    for name in [
        "ProviderKey",
        "Model",
        "Target",
        "Routing",
        "RateLimit",
        "Cost",
        "Cache",
        "ApiKey",
        "Budget",
        "JwtProvider",
        "ClaimMappings",
    ] {
        assert_eq!(
            schemas[name]["additionalProperties"],
            Value::Bool(false),
            "{name} must set additionalProperties: false"
        );
    }
    let required = |name: &str| -> BTreeSet<&str> {
        schemas[name]["required"]
            .as_array()
            .map(|a| a.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default()
    };
    assert_eq!(
        required("ProviderKey"),
        BTreeSet::from(["display_name", "secret", "api_base"])
    );
    assert_eq!(required("Model"), BTreeSet::from(["display_name"]));
    assert_eq!(
        required("Target"),
        BTreeSet::from(["provider_key_id", "model_name"])
    );
    // An api key holds a key hash or binds a JWT identity.
    assert_eq!(required("ApiKey"), BTreeSet::new());
    let alternatives: Vec<&Value> = schemas["ApiKey"]["anyOf"]
        .as_array()
        .expect("ApiKey.anyOf")
        .iter()
        .map(|a| &a["required"])
        .collect();
    assert_eq!(
        alternatives,
        [
            &serde_json::json!(["key_hash"]),
            &serde_json::json!(["jwt_provider_id"])
        ]
    );
    assert_eq!(
        required("JwtProvider"),
        BTreeSet::from(["display_name", "issuer", "audiences"])
    );
    assert_eq!(required("Budget"), BTreeSet::from(["max_usd"]));
    assert_eq!(required("Error"), BTreeSet::from(["error_msg"]));
    assert_eq!(
        schemas["ApiKey"]["properties"]["expires_at"]["format"],
        "date-time"
    );
}

#[test]
fn security_schemes_and_open_routes() {
    let doc = doc();
    let schemes = &doc["components"]["securitySchemes"];
    assert_eq!(schemes["bearerAuth"]["type"], "http");
    assert_eq!(schemes["bearerAuth"]["scheme"], "bearer");
    assert_eq!(schemes["apiKeyHeader"]["type"], "apiKey");
    assert_eq!(schemes["apiKeyHeader"]["in"], "header");
    assert_eq!(schemes["apiKeyHeader"]["name"], "x-api-key");
    assert!(!doc["security"]
        .as_array()
        .expect("global security")
        .is_empty());
    for open in ["/livez", "/readyz", "/admin/openapi.json"] {
        assert_eq!(
            doc["paths"][open]["get"]["security"],
            Value::Array(vec![]),
            "{open} needs no key"
        );
    }
}

#[test]
fn operations_are_well_formed() {
    let doc = doc();
    let mut operation_ids = BTreeSet::new();
    for (path, method) in expected_routes() {
        let op = &doc["paths"][&path][&method];
        let id = op["operationId"]
            .as_str()
            .unwrap_or_else(|| panic!("{method} {path}: no operationId"));
        assert!(
            operation_ids.insert(id.to_string()),
            "duplicate operationId {id}"
        );
        let responses = op["responses"]
            .as_object()
            .unwrap_or_else(|| panic!("{method} {path}: no responses"));
        assert!(
            responses.keys().any(|code| code.starts_with('2')),
            "{method} {path}: no success response"
        );
        if path.starts_with("/admin/v1/") {
            assert!(
                responses.contains_key("401"),
                "{method} {path}: 401 undocumented"
            );
        }
        if method == "post" || method == "put" {
            assert_eq!(
                op["requestBody"]["required"],
                Value::Bool(true),
                "{method} {path}: body"
            );
            for code in ["400", "409", "413"] {
                assert!(
                    responses.contains_key(code),
                    "{method} {path}: {code} undocumented"
                );
            }
        }
        if path.ends_with("{id}") {
            let params = op["parameters"].as_array().expect("parameters");
            let names: Vec<&str> = params
                .iter()
                .map(|p| match p["$ref"].as_str() {
                    Some(r) => doc.pointer(&r[1..]).expect("parameter ref")["name"]
                        .as_str()
                        .unwrap_or_default(),
                    None => p["name"].as_str().unwrap_or_default(),
                })
                .collect();
            assert!(names.contains(&"id"), "{method} {path}: no id parameter");
            if method == "put" || method == "delete" {
                assert!(
                    names.contains(&"If-Match"),
                    "{method} {path}: no If-Match parameter"
                );
            }
        }
    }
    assert!(doc["paths"]["/admin/v1/models/{id}"]["put"]["responses"]
        .as_object()
        .is_some_and(|r| r.contains_key("200") && r.contains_key("201")));

    let query_names = |path: &str| -> BTreeSet<String> {
        doc["paths"][path]["get"]["parameters"]
            .as_array()
            .expect("query parameters")
            .iter()
            .filter(|p| p["in"] == "query")
            .filter_map(|p| p["name"].as_str().map(String::from))
            .collect()
    };
    assert_eq!(
        query_names("/admin/v1/events"),
        ["resource", "resource_id", "from_seq", "to_seq", "limit"]
            .map(String::from)
            .into()
    );
    assert_eq!(
        query_names("/admin/v1/usage"),
        ["group_by", "from", "to"].map(String::from).into()
    );
}
