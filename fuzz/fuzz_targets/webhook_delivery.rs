#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| warren_fuzz::checks::webhook_delivery(data));
