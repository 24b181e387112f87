#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| usher::fuzz::imap_prelogin(data));
