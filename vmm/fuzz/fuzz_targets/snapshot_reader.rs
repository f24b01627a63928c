//! The snapshot file reader on arbitrary bytes: header, state, chunk table
//! and every memory chunk, as `CaptureDir::import` reads them. It must
//! return an error, never panic or hang, and allocate no more than the
//! format's limits (and the input) allow.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sandfork_vmm::snapshot::SnapshotReader;

fuzz_target!(|data: &[u8]| {
    let Ok((mut reader, state)) = SnapshotReader::open(data, data.len() as u64) else {
        return;
    };
    assert_eq!(state.memory_bytes, reader.header().memory_bytes);
    while let Ok(Some(_)) = reader.next_chunk() {}
});
