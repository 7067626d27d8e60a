//! The handshake parsers must never panic on what a hostile peer sends.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    multiproc::connection::fuzz_handshake_parsers(data);
});
