//! `STOLON_LIBIBVERBS` is tried before the system library. Alone in its test binary because it
//! sets an environment variable.

#[test]
fn the_environment_variable_comes_first() {
    std::env::set_var(stolon_verbs::sys::ENV_PATH, "/opt/custom/libibverbs.so.1");
    let paths = stolon_verbs::sys::candidate_paths();
    assert_eq!(
        paths,
        vec![
            "/opt/custom/libibverbs.so.1".to_string(),
            "libibverbs.so.1".to_string()
        ]
    );
    let err = stolon_verbs::sys::load_from(&paths[..1])
        .err()
        .expect("no such file");
    assert!(err.to_string().contains("/opt/custom/libibverbs.so.1"));
    std::env::set_var(stolon_verbs::sys::ENV_PATH, "");
    assert_eq!(
        stolon_verbs::sys::candidate_paths(),
        vec!["libibverbs.so.1".to_string()]
    );
}
