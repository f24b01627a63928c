//! The snapshot file reader on arbitrary bytes: header, state, chunk table
//! and every memory chunk, as `CaptureDir::import` reads them. It must
//! return an error, never panic or hang, and allocate no more than the
//! format's limits (and the input) allow.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sandfork_vmm::snapshot::format::{HEADER_LEN, Header, SnapshotReader, SnapshotState};

fn read(data: &[u8], file_len: u64) {
    let Ok((mut reader, state)) = SnapshotReader::open(data, file_len) else {
        return;
    };
    assert_eq!(state.memory_bytes, reader.header().memory_bytes);
    while let Ok(Some(_)) = reader.next_chunk() {}
}

fuzz_target!(|data: &[u8]| {
    // The input as a whole file.
    read(data, data.len() as u64);
    // The input as the front of a file as long as its header says: a file
    // of a valid size holds at least 64 MiB of memory, more than an input,
    // so this is how the state, the chunk table and the memory are reached.
    if let Some(front) = data.first_chunk::<HEADER_LEN>()
        && let Ok(header) = Header::decode(front)
    {
        read(data, header.file_len());
    }
    // The input as a state on its own: mutations of a state inside a file
    // mostly fail its checksum before it is decoded.
    let _ = SnapshotState::decode(data);
});
