//! `keyward api-reference` prints the checked-in `docs/api-reference.md`, which is how
//! `hack/generate.sh` writes it (the unit test `checked_in_api_reference_matches_the_types`
//! in `src/api/reference.rs` compares the file with the types). No API server needed.

use std::process::Command;

#[test]
fn keyward_api_reference_prints_the_checked_in_reference() {
    let out = Command::new(env!("CARGO_BIN_EXE_keyward")).arg("api-reference").output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let path = format!("{}/{}", env!("CARGO_MANIFEST_DIR"), keyward::api::API_REFERENCE_FILE);
    let checked_in = std::fs::read_to_string(&path).unwrap();
    assert!(
        String::from_utf8(out.stdout).unwrap() == checked_in,
        "`keyward api-reference` differs from {path}: run hack/generate.sh"
    );
    // It needs no cluster: no kubeconfig is read.
    let out = Command::new(env!("CARGO_BIN_EXE_keyward"))
        .arg("api-reference")
        .env("KUBECONFIG", "/nonexistent")
        .env("KEYWARD_KUBECONFIG", "/nonexistent")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}
