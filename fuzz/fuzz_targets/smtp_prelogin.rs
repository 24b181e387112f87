#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| usher::fuzz::smtp_prelogin(data));
