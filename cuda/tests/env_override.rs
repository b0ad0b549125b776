//! `$STOLON_LIBCUDA` is tried first, and a failure there is reported with the path. Its own test
//! binary with a single test, so setting the variable cannot race with other tests' first load.

use stolon_cuda::{sys, Error};

#[test]
fn stolon_libcuda_is_tried_first_and_named_in_the_error() {
    let bogus = "/nonexistent/stolon-env-test/libcuda.so.1";
    std::env::set_var(sys::ENV_LIBCUDA, bogus);
    assert_eq!(sys::candidate_paths()[0], bogus);
    match sys::driver() {
        Ok(d) => eprintln!(
            "SKIP (partly): a driver loads here anyway, from {} (after {bogus} failed)",
            d.path
        ),
        Err(e) => {
            assert_eq!(e.tried[0].0, bogus);
            let err = stolon_cuda::Device::get(0).unwrap_err();
            assert!(matches!(err, Error::LibraryNotFound(_)), "{err:?}");
            assert!(err.to_string().contains(bogus), "{err}");
            assert!(!stolon_cuda::is_present());
        }
    }
}
