//! The JSON gateway (grpc-gateway style) on the client port.
pub fn router(_backend: std::sync::Arc<super::Backend>) -> axum::Router {
    axum::Router::new()
}
