//! The one typed API client: a base URL and a `reqwest` client, with a method per route.
//! The in-process [`TestApp`](super::TestApp) and the child [`ServerProcess`](super::ServerProcess)
//! both dereference to it, so a test speaks to either the same way.

use keypackage_server::wire::{
    KeyPackageResponse, KeyPackageStatus, SigningKeyFingerprint, UploadKeyPackagesRequest,
};
use prost::Message;

use super::{decode, token, upload_request};

/// A client for one server; clones share the connection pool.
#[derive(Clone)]
pub(crate) struct ApiClient {
    /// `http://127.0.0.1:PORT`.
    pub(crate) base: String,
    /// A plain HTTP client.
    pub(crate) client: reqwest::Client,
}

impl ApiClient {
    /// A client for the server at `base`.
    pub(crate) fn new(base: String) -> Self {
        Self {
            base,
            client: reqwest::Client::new(),
        }
    }

    /// An absolute URL for `path`.
    pub(crate) fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// `HOST:PORT`, for raw connections.
    pub(crate) fn addr(&self) -> &str {
        self.base.trim_start_matches("http://")
    }

    /// POSTs a protobuf upload as `user`.
    pub(crate) async fn upload_raw(
        &self,
        user: &str,
        request: &UploadKeyPackagesRequest,
    ) -> reqwest::Response {
        self.client
            .post(self.url("/api/v1/key-packages"))
            .bearer_auth(token(user))
            .header("content-type", "application/x-protobuf")
            .body(request.encode_to_vec())
            .send()
            .await
            .expect("request")
    }

    /// POSTs `body` to the upload route as `user` with the given `Content-Type` (none if `None`).
    pub(crate) async fn upload_body(
        &self,
        user: &str,
        content_type: Option<&str>,
        body: impl Into<reqwest::Body>,
    ) -> reqwest::Response {
        let mut request = self
            .client
            .post(self.url("/api/v1/key-packages"))
            .bearer_auth(token(user))
            .body(body);
        if let Some(content_type) = content_type {
            request = request.header("content-type", content_type);
        }
        request.send().await.expect("request")
    }

    /// Uploads entries as `user`, expecting 201, and returns the status.
    pub(crate) async fn upload(
        &self,
        user: &str,
        entries: &[(Vec<u8>, bool)],
        fingerprint: &str,
    ) -> KeyPackageStatus {
        let response = self
            .upload_raw(user, &upload_request(entries, fingerprint))
            .await;
        assert_eq!(
            response.status(),
            201,
            "upload failed: {:?}",
            response.text().await
        );
        decode(response).await
    }

    /// GETs `/api/v1/key-packages/{target}` as `caller`.
    pub(crate) async fn consume_raw(&self, caller: &str, target: &str) -> reqwest::Response {
        self.client
            .get(self.url(&format!("/api/v1/key-packages/{target}")))
            .bearer_auth(token(caller))
            .send()
            .await
            .expect("request")
    }

    /// GETs `/api/v1/key-packages/{target}?{query}` as `caller`, asking for JSON if `json`.
    pub(crate) async fn consume_query(
        &self,
        caller: &str,
        target: &str,
        query: &str,
        json: bool,
    ) -> reqwest::Response {
        let mut request = self
            .client
            .get(self.url(&format!("/api/v1/key-packages/{target}?{query}")))
            .bearer_auth(token(caller));
        if json {
            request = request.header("accept", "application/json");
        }
        request.send().await.expect("request")
    }

    /// Consumes one of `target`'s packages as `caller`, expecting 200.
    pub(crate) async fn consume(&self, caller: &str, target: &str) -> KeyPackageResponse {
        let response = self.consume_raw(caller, target).await;
        assert_eq!(
            response.status(),
            200,
            "consume failed: {:?}",
            response.text().await
        );
        decode(response).await
    }

    /// Consumes `target`'s packages as "alice", expecting exactly `expected`, in this order.
    pub(crate) async fn assert_hands_out(&self, target: &str, expected: &[Vec<u8>]) {
        for (i, want) in expected.iter().enumerate() {
            let got = self
                .consume("alice", target)
                .await
                .key_package_data
                .to_vec();
            assert_eq!(&got, want, "hand-out {i} of {target}");
        }
    }

    /// The caller's own status, expecting 200.
    pub(crate) async fn status(&self, user: &str) -> KeyPackageStatus {
        let response = self
            .client
            .get(self.url("/api/v1/key-packages"))
            .bearer_auth(token(user))
            .send()
            .await
            .expect("request");
        assert_eq!(
            response.status(),
            200,
            "status: {:?}",
            response.text().await
        );
        decode(response).await
    }

    /// GETs the caller's own status with this `Authorization` value (no header if `None`).
    pub(crate) async fn status_with(&self, authorization: Option<&str>) -> reqwest::Response {
        let mut request = self.client.get(self.url("/api/v1/key-packages"));
        if let Some(value) = authorization {
            request = request.header("authorization", value);
        }
        request.send().await.expect("request")
    }

    /// GETs `user`'s fingerprint as `caller`.
    pub(crate) async fn fingerprint_raw(&self, caller: &str, user: &str) -> reqwest::Response {
        self.client
            .get(self.url(&format!("/api/v1/users/{user}/fingerprint")))
            .bearer_auth(token(caller))
            .send()
            .await
            .expect("request")
    }

    /// `user`'s fingerprint, expecting 200.
    pub(crate) async fn fingerprint(&self, caller: &str, user: &str) -> SigningKeyFingerprint {
        let response = self.fingerprint_raw(caller, user).await;
        assert_eq!(response.status(), 200);
        decode(response).await
    }

    /// DELETEs the caller's packages.
    pub(crate) async fn delete_all(&self, user: &str) -> reqwest::Response {
        self.client
            .delete(self.url("/api/v1/key-packages"))
            .bearer_auth(token(user))
            .send()
            .await
            .expect("request")
    }

    /// Asserts that the server still serves a normal request.
    pub(crate) async fn assert_alive(&self) {
        let response = self
            .client
            .get(self.url("/api/v1/key-packages"))
            .bearer_auth(token("alive-check"))
            .timeout(super::PATIENCE)
            .send()
            .await
            .expect("the server still answers");
        assert_eq!(response.status(), 200);
    }
}
