//! Every folder under `fixtures/hostile/` lists its fixtures in `expected-codes`, and every
//! fixture checks (`policy::inspect`, as `glimpse check FILE`) with exactly the codes listed
//! there, in order. The format's own tests assert more about their fixtures; this test makes
//! sure that no folder, and no fixture, is left out.

use std::fs;

use glimpse_testkit::hostile;

#[test]
fn every_hostile_fixture_checks_as_listed() {
    let root = glimpse_testkit::fixtures_dir().join("hostile");
    let mut folders: Vec<String> = fs::read_dir(&root)
        .expect("fixtures/hostile exists")
        .map(|e| e.expect("a readable entry"))
        .filter(|e| e.path().is_dir())
        .map(|e| e.file_name().into_string().expect("a UTF-8 folder name"))
        .collect();
    folders.sort();
    assert!(folders.len() >= 10, "only {folders:?}");
    let mut seen = 0;
    for folder in &folders {
        seen += hostile::check_dir(folder).len();
    }
    assert!(seen > 60, "only {seen} fixtures checked");
}
