use crate::helpers::*;

#[tokio::test]
async fn uploaded_package_is_handed_out_then_the_last_resort_one() {
    let app = spawn_app().await;
    let status = app
        .upload("bob", &[(kp("r1"), false), (kp("lr"), true)], &fingerprint('a'))
        .await;
    assert_eq!(status.regular_count, 1);
    assert!(status.has_last_resort);
    let first = app.consume("alice", "bob").await;
    assert_eq!(first.key_package_data.to_vec(), kp("r1"));
    assert!(!first.is_last_resort);
    let second = app.consume("alice", "bob").await;
    assert_eq!(second.key_package_data.to_vec(), kp("lr"));
    assert!(second.is_last_resort);
}
