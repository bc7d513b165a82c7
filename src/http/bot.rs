//! The bot API's routes on the HTTP port: `/bot{TOKEN}/{method}` (GET or POST) and
//! `/bot/openapi.json`. The methods themselves live in `crate::bot`.
//!
//! What it owns: reading parameters from the query string and the body (JSON object or
//! `application/x-www-form-urlencoded`, at most [`REQUEST_BODY_BYTES_MAX`] bytes), the
//! `{"ok": true, "result": …}` / `{"ok": false, …}` envelope and the `Retry-After`
//! header of an answer with a retry hint. What it must not do: interpret a method, or
//! decide which node answers it and how long that may take (`crate::bot`: a call may
//! be answered by another node, `bot/forward.rs`).

use axum::Router;
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get};
use serde_json::{Value, json};

use super::Ctx;
use crate::bot::{BotError, OPENAPI_JSON, Params, REQUEST_BODY_BYTES_MAX};

/// The bot routes, merged into the node's router.
pub(super) fn routes() -> Router<Ctx> {
    Router::new()
        .route("/bot/openapi.json", get(openapi))
        .route("/{token}/{method}", any(call))
}

async fn openapi() -> Response {
    ([(header::CONTENT_TYPE, "application/json")], OPENAPI_JSON).into_response()
}

fn answer(result: Result<Value, BotError>) -> Response {
    match result {
        Ok(v) => axum::Json(json!({"ok": true, "result": v})).into_response(),
        Err(e) => {
            let status =
                StatusCode::from_u16(e.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            let mut r = (status, axum::Json(e.to_json())).into_response();
            if let Some(s) = e.retry_after_s
                && let Ok(v) = HeaderValue::from_str(&s.to_string())
            {
                r.headers_mut().insert(header::RETRY_AFTER, v);
            }
            r
        }
    }
}

/// Decodes `%XX` and `+` of a query string or form value.
fn percent_decode(s: &str) -> Result<String, BotError> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' => {
                let hex = bytes
                    .get(i + 1..i + 3)
                    .and_then(|h| std::str::from_utf8(h).ok())
                    .and_then(|h| u8::from_str_radix(h, 16).ok())
                    .ok_or_else(|| BotError::bad("bad %-escape in the parameters"))?;
                out.push(hex);
                i += 2;
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8(out).map_err(|_| BotError::bad("parameters are not UTF-8"))
}

/// Adds the `name=value&…` pairs of `s` to `params` (values as JSON strings).
pub(crate) fn parse_urlencoded(s: &str, params: &mut Params) -> Result<(), BotError> {
    for pair in s.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        params.insert(percent_decode(k)?, Value::String(percent_decode(v)?));
    }
    Ok(())
}

/// The call's parameters: query string, then the body's (which win).
async fn params(uri: &Uri, headers: &HeaderMap, body: Body) -> Result<Params, BotError> {
    let mut p = Params::new();
    if let Some(q) = uri.query() {
        parse_urlencoded(q, &mut p)?;
    }
    let bytes = axum::body::to_bytes(body, REQUEST_BODY_BYTES_MAX)
        .await
        .map_err(|_| {
            BotError::new(
                413,
                format!("the request body is over {REQUEST_BODY_BYTES_MAX} bytes"),
            )
        })?;
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Ok(p);
    }
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_ascii_lowercase();
    let json = content_type.contains("json")
        || (content_type.is_empty() && bytes.trim_ascii_start().starts_with(b"{"));
    if json {
        match serde_json::from_slice::<Value>(&bytes) {
            Ok(Value::Object(m)) => p.extend(m),
            Ok(_) => return Err(BotError::bad("the JSON body must be an object")),
            Err(e) => return Err(BotError::bad(format!("the body is not JSON: {e}"))),
        }
    } else if content_type.is_empty() || content_type.contains("x-www-form-urlencoded") {
        let text =
            std::str::from_utf8(&bytes).map_err(|_| BotError::bad("the body is not UTF-8"))?;
        parse_urlencoded(text.trim(), &mut p)?;
    } else {
        return Err(BotError::bad(format!(
            "content type {content_type:?} is not supported: send JSON or a URL-encoded form"
        )));
    }
    Ok(p)
}

async fn call(State(ctx): State<Ctx>, uri: Uri, headers: HeaderMap, body: Body) -> Response {
    let path = uri.path().trim_start_matches('/');
    let Some((first, method)) = path.split_once('/') else {
        return super::not_found().await;
    };
    let Some(token) = first.strip_prefix("bot") else {
        return super::not_found().await;
    };
    let params = match params(&uri, &headers, body).await {
        Ok(p) => p,
        Err(e) => return answer(Err(e)),
    };
    let idempotency = headers
        .get("idempotency-key")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    // Bounded there: by `CALL_TIMEOUT` on the node that answers, and by
    // `bot::forward::FORWARD_TIMEOUT` per node a forwarded call is sent to.
    let result = ctx
        .bots
        .call(token, method, &params, idempotency.as_deref())
        .await;
    answer(result)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn urlencoded_parameters_decode() {
        let mut p = Params::new();
        parse_urlencoded("chat_id=65537&text=h%C3%A9llo+there&empty=&flag", &mut p)
            .expect("parses");
        assert_eq!(p["chat_id"], "65537");
        assert_eq!(p["text"], "héllo there");
        assert_eq!(p["empty"], "");
        assert_eq!(p["flag"], "");
        assert!(parse_urlencoded("a=%G1", &mut Params::new()).is_err());
        assert!(parse_urlencoded("a=%C3", &mut Params::new()).is_err());
    }

    #[test]
    fn a_rate_limit_answer_carries_retry_after() {
        let r = answer(Err(BotError::rate_limited(
            "sends",
            Duration::from_millis(300),
        )));
        assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(r.headers()[header::RETRY_AFTER], "1");
    }
}
