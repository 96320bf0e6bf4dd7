//! The protobuf messages of `keypackages.v1`, and content negotiation between their binary
//! encoding and the canonical proto3 JSON mapping.

use axum::{
    body::Bytes,
    extract::{FromRequest, FromRequestParts, Request},
    http::{header, request::Parts, HeaderMap, HeaderValue, StatusCode},
    response::{IntoResponse, Response},
};
use prost::Message;
use serde::{de::DeserializeOwned, Serialize};

use crate::error::ApiError;

#[allow(missing_docs, clippy::all)]
mod generated {
    include!(concat!(env!("OUT_DIR"), "/keypackages.v1.rs"));
    include!(concat!(env!("OUT_DIR"), "/keypackages.v1.serde.rs"));
}
pub use generated::*;

/// Media type of binary protobuf bodies.
pub const PROTOBUF: &str = "application/x-protobuf";
/// Media type of proto3 JSON bodies.
pub const JSON: &str = "application/json";

/// The two encodings a body can have.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// Binary protobuf.
    Protobuf,
    /// The canonical proto3 JSON mapping.
    Json,
}

impl Format {
    /// The encoding a `Content-Type` names; `None` for anything else, parameters ignored.
    pub fn from_content_type(value: &str) -> Option<Self> {
        let media = value.split(';').next().unwrap_or("").trim();
        if media.eq_ignore_ascii_case("application/x-protobuf")
            || media.eq_ignore_ascii_case("application/protobuf")
        {
            Some(Self::Protobuf)
        } else if media.eq_ignore_ascii_case(JSON) {
            Some(Self::Json)
        } else {
            None
        }
    }

    /// The response encoding an `Accept` header asks for: JSON only when it is preferred
    /// strictly over protobuf, protobuf otherwise (including when the header is missing).
    pub fn from_accept(value: Option<&str>) -> Self {
        let Some(value) = value else {
            return Self::Protobuf;
        };
        let json = accept_quality(value, &["application/json"]);
        let protobuf = accept_quality(value, &["application/x-protobuf", "application/protobuf"]);
        if json > protobuf {
            Self::Json
        } else {
            Self::Protobuf
        }
    }

    /// Decodes a request body of this encoding into `T`; any failure is `malformed_body`.
    pub fn decode<T: Message + DeserializeOwned + Default>(
        self,
        body: Bytes,
    ) -> Result<T, ApiError> {
        let name = std::any::type_name::<T>()
            .rsplit("::")
            .next()
            .unwrap_or("request");
        match self {
            Self::Protobuf => T::decode(body).map_err(|_| ApiError::MalformedBody(name)),
            Self::Json => serde_json::from_slice(&body).map_err(|_| ApiError::MalformedBody(name)),
        }
    }
}

/// The quality (0–1000) the `Accept` header gives to any of `types`, using the most specific
/// matching range, as RFC 9110 §12.5.1 prescribes.
fn accept_quality(header: &str, types: &[&str]) -> u16 {
    let mut best: Option<(u8, u16)> = None; // (specificity, quality)
    for range in header.split(',') {
        let mut parts = range.split(';');
        let media = parts.next().unwrap_or("").trim();
        let quality = parts
            .filter_map(|p| {
                p.trim()
                    .strip_prefix("q=")
                    .or_else(|| p.trim().strip_prefix("Q="))
            })
            .next()
            .and_then(|q| q.trim().parse::<f32>().ok())
            .map_or(1000, |q| (q.clamp(0.0, 1.0) * 1000.0) as u16);
        let specificity = if types.iter().any(|t| media.eq_ignore_ascii_case(t)) {
            3
        } else if media.eq_ignore_ascii_case("application/*") {
            2
        } else if media == "*/*" {
            1
        } else {
            continue;
        };
        if best.is_none_or(|(s, _)| specificity > s) {
            best = Some((specificity, quality));
        }
    }
    best.map_or(0, |(_, q)| q)
}

/// A request body decoded from protobuf or JSON according to its `Content-Type`.
#[derive(Debug)]
pub struct Wire<T>(pub T);

impl<S, T> FromRequest<S> for Wire<T>
where
    S: Send + Sync,
    T: Message + DeserializeOwned + Default,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let format = req
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .and_then(Format::from_content_type)
            .ok_or(ApiError::UnsupportedMediaType)?;
        let body = Bytes::from_request(req, state).await.map_err(|rejection| {
            if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::PayloadTooLarge
            } else {
                ApiError::MalformedBody("request")
            }
        })?;
        format.decode(body).map(Wire)
    }
}

/// The response encoding the client asked for with `Accept`.
#[derive(Clone, Copy, Debug)]
pub struct Negotiated(pub Format);

impl<S: Send + Sync> FromRequestParts<S> for Negotiated {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        Ok(Self(response_format(&parts.headers)))
    }
}

/// The response format for these request headers.
pub fn response_format(headers: &HeaderMap) -> Format {
    Format::from_accept(headers.get(header::ACCEPT).and_then(|v| v.to_str().ok()))
}

/// A message encoded for the response in the negotiated format.
#[derive(Debug)]
pub struct Reply<T>(pub Format, pub T);

impl<T: Message + Serialize> IntoResponse for Reply<T> {
    fn into_response(self) -> Response {
        let Self(format, message) = self;
        match format {
            Format::Protobuf => (
                [(header::CONTENT_TYPE, HeaderValue::from_static(PROTOBUF))],
                message.encode_to_vec(),
            )
                .into_response(),
            Format::Json => match serde_json::to_vec(&message) {
                Ok(body) => (
                    [(header::CONTENT_TYPE, HeaderValue::from_static(JSON))],
                    body,
                )
                    .into_response(),
                Err(e) => {
                    tracing::error!(error = %e, "response did not serialize");
                    ApiError::Internal.into_response()
                }
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_type_accepts_both_protobuf_names_json_and_parameters() {
        use Format::*;
        assert_eq!(
            Format::from_content_type("application/x-protobuf"),
            Some(Protobuf)
        );
        assert_eq!(
            Format::from_content_type("application/protobuf"),
            Some(Protobuf)
        );
        assert_eq!(
            Format::from_content_type("Application/JSON; charset=utf-8"),
            Some(Json)
        );
        assert_eq!(Format::from_content_type("text/plain"), None);
        assert_eq!(Format::from_content_type("application/jsonx"), None);
        assert_eq!(Format::from_content_type(""), None);
    }

    #[test]
    fn accept_prefers_protobuf_unless_json_wins() {
        use Format::*;
        assert_eq!(Format::from_accept(None), Protobuf);
        assert_eq!(Format::from_accept(Some("*/*")), Protobuf);
        assert_eq!(Format::from_accept(Some("application/json")), Json);
        assert_eq!(
            Format::from_accept(Some("application/json, */*;q=0.1")),
            Json
        );
        assert_eq!(
            Format::from_accept(Some("application/x-protobuf;q=0.5, application/json")),
            Json
        );
        assert_eq!(
            Format::from_accept(Some("application/json;q=0.5, application/protobuf")),
            Protobuf
        );
        assert_eq!(Format::from_accept(Some("application/json;q=0")), Protobuf);
        assert_eq!(Format::from_accept(Some("text/html")), Protobuf);
    }

    #[test]
    fn json_mapping_is_canonical_and_accepts_snake_case() {
        let msg = KeyPackageStatus {
            regular_count: 3,
            has_last_resort: true,
            signing_key_fingerprint: String::new(),
            last_resort_handouts: 7,
            ..KeyPackageStatus::default()
        };
        let json = serde_json::to_value(&msg).unwrap();
        assert_eq!(json["regularCount"], 3);
        assert_eq!(json["lastResortHandouts"], "7");
        let req: UploadKeyPackagesRequest = serde_json::from_str(
            r#"{"entries":[{"key_package_data":"AAEABQ==","isLastResort":true}],"signing_key_fingerprint":""}"#,
        )
        .unwrap();
        assert_eq!(&req.entries[0].key_package_data[..], &[0, 1, 0, 5]);
        assert!(req.entries[0].is_last_resort);
    }
}
