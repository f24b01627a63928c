//! The saved state and the portable single-file snapshot format, encoded
//! and decoded without touching any device (so that every check here is a
//! plain unit test, and the reader can be fuzzed: `vmm/fuzz`).
//!
//! File format, little-endian:
//! - header (64 bytes): magic `SANDFORK`, format version, header length,
//!   state length and CRC32, memory chunk size, memory length, chunk count,
//!   header CRC32 (over the bytes before it);
//! - state: JSON (`SnapshotState`);
//! - chunk table: one CRC32 per memory chunk;
//! - memory: the guest memory, `memory_bytes` long.
//!
//! A reader allocates at most the header's state length (at most
//! `MAX_STATE_BYTES`, and never more than the file holds), the chunk table
//! (4 bytes per 4 MiB of memory) and one chunk.

use std::io::Read;

use serde::{Deserialize, Serialize};

use crate::capture::CaptureStats;
use crate::memory::{self, MemoryError};
use crate::vcpu::{VcpuError, VcpuState, VmState};
use crate::vm::MAX_VCPUS;

pub const MAGIC: [u8; 8] = *b"SANDFORK";
/// Bump on any change to the header or to the state's encoding (the golden
/// test in `vmm/tests/format.rs` fails until then).
pub const FORMAT_VERSION: u32 = 1;
pub const HEADER_LEN: usize = 64;
/// Memory is checksummed in chunks of this size.
pub const CHUNK_BYTES: u64 = 4 << 20;
/// Largest state a reader accepts.
pub const MAX_STATE_BYTES: u64 = 64 << 20;

/// What is wrong with a snapshot file or a saved state.
#[derive(Debug, thiserror::Error)]
pub enum FormatError {
    #[error("not a Sandfork snapshot (bad magic)")]
    BadMagic,
    #[error("snapshot format version {found} is not supported (this agent reads {FORMAT_VERSION})")]
    UnsupportedVersion { found: u32 },
    #[error("header checksum mismatch")]
    HeaderChecksum,
    #[error("unexpected header length {header_len} or chunk size {chunk_bytes}")]
    Layout { header_len: u32, chunk_bytes: u32 },
    #[error("state of {bytes} bytes is larger than {MAX_STATE_BYTES}")]
    StateTooLarge { bytes: u64 },
    #[error("invalid memory size")]
    MemorySize(#[source] MemoryError),
    #[error("{count} memory chunks for {memory_bytes} bytes of memory")]
    ChunkCount { count: u64, memory_bytes: u64 },
    #[error("truncated in the {part}")]
    Truncated {
        part: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("truncated: {file_bytes} bytes, the header describes {expected_bytes}")]
    ShortFile {
        file_bytes: u64,
        expected_bytes: u64,
    },
    #[error("{bytes} trailing bytes")]
    TrailingBytes { bytes: u64 },
    #[error("state checksum mismatch")]
    StateChecksum,
    #[error("invalid state")]
    State(#[source] serde_json::Error),
    #[error("the state says {state} bytes of memory, the header {header}")]
    MemoryMismatch { state: u64, header: u64 },
    #[error("memory chunk {index} checksum mismatch")]
    ChunkChecksum { index: u64 },
    #[error("the state has {0} vCPUs (1 to {MAX_VCPUS})")]
    VcpuCount(usize),
    #[error("vCPU {index}")]
    Vcpu {
        index: usize,
        #[source]
        source: VcpuError,
    },
}

/// Everything in a snapshot besides memory.
#[derive(Clone, Serialize, Deserialize)]
pub struct SnapshotState {
    pub memory_bytes: u64,
    pub vcpus: Vec<VcpuState>,
    pub vm: VmState,
    pub stats: CaptureStats,
    /// The sandbox it was captured from.
    pub source: String,
    /// The captured instant (the pause).
    pub created_unix_ms: u64,
    /// Whether the memory file holds all of memory. A live capture records
    /// its state right after the pause and fills memory afterwards; branches
    /// restored meanwhile fetch what is missing (`crate::fill`).
    #[serde(default = "complete_by_default")]
    pub memory_complete: bool,
}

/// The default of `memory_complete` in records that predate it.
pub fn complete_by_default() -> bool {
    true
}

impl std::fmt::Debug for SnapshotState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SnapshotState")
            .field("memory_bytes", &self.memory_bytes)
            .field("vcpus", &self.vcpus)
            .field("source", &self.source)
            .finish_non_exhaustive()
    }
}

impl SnapshotState {
    /// Decodes a state, checking that it is one a VM can be restored from
    /// (sizes within KVM's and this crate's limits).
    pub fn decode(json: &[u8]) -> Result<Self, FormatError> {
        let state: Self = serde_json::from_slice(json).map_err(FormatError::State)?;
        state.check()?;
        Ok(state)
    }

    /// The state's encoding (JSON).
    pub fn encode(&self) -> Result<Vec<u8>, FormatError> {
        serde_json::to_vec(self).map_err(FormatError::State)
    }

    /// Checks the sizes a restore relies on.
    pub fn check(&self) -> Result<(), FormatError> {
        memory::validate_size(self.memory_bytes, false).map_err(FormatError::MemorySize)?;
        crate::vm::check_vcpu_count(self.vcpus.len())
            .map_err(|_| FormatError::VcpuCount(self.vcpus.len()))?;
        for (index, vcpu) in self.vcpus.iter().enumerate() {
            vcpu.check()
                .map_err(|source| FormatError::Vcpu { index, source })?;
        }
        Ok(())
    }
}

/// The fixed-size header of a snapshot file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Header {
    pub state_len: u64,
    pub state_crc: u32,
    pub chunk_bytes: u32,
    pub memory_bytes: u64,
    pub chunk_count: u64,
}

impl Header {
    /// The header of a file holding `state_json` and `memory_bytes` of memory.
    pub fn for_state(state_json: &[u8], memory_bytes: u64) -> Self {
        Self {
            state_len: state_json.len() as u64,
            state_crc: crc32fast::hash(state_json),
            chunk_bytes: CHUNK_BYTES as u32,
            memory_bytes,
            chunk_count: memory_bytes.div_ceil(CHUNK_BYTES),
        }
    }

    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut bytes = [0u8; HEADER_LEN];
        bytes[0..8].copy_from_slice(&MAGIC);
        bytes[8..12].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
        bytes[12..16].copy_from_slice(&(HEADER_LEN as u32).to_le_bytes());
        bytes[16..24].copy_from_slice(&self.state_len.to_le_bytes());
        bytes[24..28].copy_from_slice(&self.state_crc.to_le_bytes());
        bytes[28..32].copy_from_slice(&self.chunk_bytes.to_le_bytes());
        bytes[32..40].copy_from_slice(&self.memory_bytes.to_le_bytes());
        bytes[40..48].copy_from_slice(&self.chunk_count.to_le_bytes());
        let crc = crc32fast::hash(&bytes[..HEADER_LEN - 4]);
        bytes[HEADER_LEN - 4..].copy_from_slice(&crc.to_le_bytes());
        bytes
    }

    pub fn decode(bytes: &[u8; HEADER_LEN]) -> Result<Self, FormatError> {
        let u32_at = |at: usize| {
            let mut word = [0u8; 4];
            word.copy_from_slice(&bytes[at..at + 4]);
            u32::from_le_bytes(word)
        };
        let u64_at = |at: usize| {
            let mut word = [0u8; 8];
            word.copy_from_slice(&bytes[at..at + 8]);
            u64::from_le_bytes(word)
        };
        if bytes[0..8] != MAGIC {
            return Err(FormatError::BadMagic);
        }
        let version = u32_at(8);
        if version != FORMAT_VERSION {
            return Err(FormatError::UnsupportedVersion { found: version });
        }
        if crc32fast::hash(&bytes[..HEADER_LEN - 4]) != u32_at(HEADER_LEN - 4) {
            return Err(FormatError::HeaderChecksum);
        }
        let header = Self {
            state_len: u64_at(16),
            state_crc: u32_at(24),
            chunk_bytes: u32_at(28),
            memory_bytes: u64_at(32),
            chunk_count: u64_at(40),
        };
        let header_len = u32_at(12);
        if header_len as usize != HEADER_LEN || u64::from(header.chunk_bytes) != CHUNK_BYTES {
            return Err(FormatError::Layout {
                header_len,
                chunk_bytes: header.chunk_bytes,
            });
        }
        if header.state_len > MAX_STATE_BYTES {
            return Err(FormatError::StateTooLarge {
                bytes: header.state_len,
            });
        }
        memory::validate_size(header.memory_bytes, false).map_err(FormatError::MemorySize)?;
        if header.chunk_count != header.memory_bytes.div_ceil(CHUNK_BYTES) {
            return Err(FormatError::ChunkCount {
                count: header.chunk_count,
                memory_bytes: header.memory_bytes,
            });
        }
        Ok(header)
    }

    /// The length of the whole file this header describes.
    pub fn file_len(&self) -> u64 {
        // Cannot overflow: each term is bounded by `decode`'s checks.
        HEADER_LEN as u64 + self.state_len + self.chunk_count * 4 + self.memory_bytes
    }
}

/// Reads a snapshot file front to back, checking every checksum: the
/// header and state first, then the memory chunk by chunk.
pub struct SnapshotReader<R> {
    reader: R,
    header: Header,
    crcs: Vec<u32>,
    next: usize,
    chunk: Vec<u8>,
}

impl<R: Read> SnapshotReader<R> {
    /// Reads and checks the header, the state and the chunk table of a file
    /// of `file_len` bytes.
    pub fn open(mut reader: R, file_len: u64) -> Result<(Self, SnapshotState), FormatError> {
        let truncated = |part| move |source| FormatError::Truncated { part, source };
        let mut header_bytes = [0u8; HEADER_LEN];
        reader
            .read_exact(&mut header_bytes)
            .map_err(truncated("header"))?;
        let header = Header::decode(&header_bytes)?;
        let expected_bytes = header.file_len();
        if file_len < expected_bytes {
            return Err(FormatError::ShortFile {
                file_bytes: file_len,
                expected_bytes,
            });
        }
        if file_len > expected_bytes {
            return Err(FormatError::TrailingBytes {
                bytes: file_len - expected_bytes,
            });
        }
        let mut state_json = vec![0u8; header.state_len as usize];
        reader
            .read_exact(&mut state_json)
            .map_err(truncated("state"))?;
        if crc32fast::hash(&state_json) != header.state_crc {
            return Err(FormatError::StateChecksum);
        }
        let state = SnapshotState::decode(&state_json)?;
        if state.memory_bytes != header.memory_bytes {
            return Err(FormatError::MemoryMismatch {
                state: state.memory_bytes,
                header: header.memory_bytes,
            });
        }
        let mut table = vec![0u8; header.chunk_count as usize * 4];
        reader
            .read_exact(&mut table)
            .map_err(truncated("chunk table"))?;
        let crcs = table
            .chunks_exact(4)
            .map(|crc| u32::from_le_bytes([crc[0], crc[1], crc[2], crc[3]]))
            .collect();
        let reader = Self {
            reader,
            header,
            crcs,
            next: 0,
            chunk: Vec::new(),
        };
        Ok((reader, state))
    }

    pub fn header(&self) -> &Header {
        &self.header
    }

    /// The next chunk of memory and its offset, checked against its
    /// checksum; `None` after the last.
    pub fn next_chunk(&mut self) -> Result<Option<(u64, &[u8])>, FormatError> {
        let Some(&crc) = self.crcs.get(self.next) else {
            return Ok(None);
        };
        let index = self.next as u64;
        let start = index * CHUNK_BYTES;
        let len = CHUNK_BYTES.min(self.header.memory_bytes - start) as usize;
        self.chunk.resize(len, 0);
        self.reader
            .read_exact(&mut self.chunk)
            .map_err(|source| FormatError::Truncated {
                part: "memory",
                source,
            })?;
        if crc32fast::hash(&self.chunk) != crc {
            return Err(FormatError::ChunkChecksum { index });
        }
        self.next += 1;
        Ok(Some((start, &self.chunk)))
    }
}

#[cfg(test)]
mod tests {
    use std::io::Read;

    use super::*;
    use crate::vcpu::VcpuState;

    const MEMORY: u64 = 64 << 20;

    fn vcpu() -> VcpuState {
        VcpuState {
            id: 0,
            cpuid: vec![Default::default(); 2],
            mp_state: Default::default(),
            regs: Default::default(),
            sregs: Default::default(),
            xsave: vec![0; 1024],
            xcrs: Default::default(),
            debug_regs: Default::default(),
            lapic: Default::default(),
            msrs: vec![Default::default(); 3],
            events: Default::default(),
        }
    }

    fn state() -> SnapshotState {
        SnapshotState {
            memory_bytes: MEMORY,
            vcpus: vec![vcpu()],
            vm: VmState {
                irqchips: Vec::new(),
                clock: Default::default(),
            },
            stats: Default::default(),
            source: "test".into(),
            created_unix_ms: 0,
            memory_complete: true,
        }
    }

    /// The front of a file (header, state, chunk table) for `state` with
    /// all-zero memory, and the file's length.
    fn front(state: &SnapshotState) -> (Vec<u8>, u64) {
        let json = state.encode().unwrap();
        let header = Header::for_state(&json, state.memory_bytes);
        let zero_chunk_crc = crc32fast::hash(&vec![0u8; CHUNK_BYTES as usize]);
        let mut bytes = header.encode().to_vec();
        bytes.extend_from_slice(&json);
        for _ in 0..header.chunk_count {
            bytes.extend_from_slice(&zero_chunk_crc.to_le_bytes());
        }
        (bytes, header.file_len())
    }

    /// The whole file: `front` followed by zero memory, never allocated.
    fn file(front: &[u8], memory: u64) -> impl Read + '_ {
        front.chain(std::io::repeat(0).take(memory))
    }

    fn open(front: &[u8], file_len: u64) -> Result<SnapshotState, FormatError> {
        let memory = file_len.saturating_sub(front.len() as u64);
        SnapshotReader::open(file(front, memory), file_len).map(|(_, state)| state)
    }

    /// Re-seals the header's checksum after a field was changed.
    fn reseal(bytes: &mut [u8]) {
        let crc = crc32fast::hash(&bytes[..HEADER_LEN - 4]);
        bytes[HEADER_LEN - 4..HEADER_LEN].copy_from_slice(&crc.to_le_bytes());
    }

    #[test]
    fn a_whole_file_reads_back() {
        let (bytes, len) = front(&state());
        let (mut reader, read) = SnapshotReader::open(file(&bytes, MEMORY), len).unwrap();
        assert_eq!(read.memory_bytes, MEMORY);
        assert_eq!(read.vcpus.len(), 1);
        let mut chunks = 0;
        let mut end = 0;
        while let Some((start, chunk)) = reader.next_chunk().unwrap() {
            assert_eq!(start, end);
            end += chunk.len() as u64;
            chunks += 1;
        }
        assert_eq!((chunks, end), (MEMORY / CHUNK_BYTES, MEMORY));
    }

    #[test]
    fn the_header_round_trips() {
        let header = Header::for_state(b"{}", MEMORY);
        assert_eq!(Header::decode(&header.encode()).unwrap(), header);
    }

    #[test]
    fn bad_magic() {
        let (mut bytes, len) = front(&state());
        bytes[0] = b'X';
        assert!(matches!(open(&bytes, len), Err(FormatError::BadMagic)));
    }

    #[test]
    fn unsupported_version() {
        let (mut bytes, len) = front(&state());
        bytes[8..12].copy_from_slice(&2u32.to_le_bytes());
        reseal(&mut bytes);
        assert!(matches!(
            open(&bytes, len),
            Err(FormatError::UnsupportedVersion { found: 2 })
        ));
    }

    #[test]
    fn header_checksum() {
        let (mut bytes, len) = front(&state());
        bytes[20] ^= 1;
        assert!(matches!(
            open(&bytes, len),
            Err(FormatError::HeaderChecksum)
        ));
        let (mut bytes, len) = front(&state());
        bytes[HEADER_LEN - 1] ^= 1;
        assert!(matches!(
            open(&bytes, len),
            Err(FormatError::HeaderChecksum)
        ));
    }

    #[test]
    fn header_and_chunk_sizes() {
        let (mut bytes, len) = front(&state());
        bytes[12..16].copy_from_slice(&65u32.to_le_bytes());
        reseal(&mut bytes);
        assert!(matches!(
            open(&bytes, len),
            Err(FormatError::Layout { header_len: 65, .. })
        ));
        let (mut bytes, len) = front(&state());
        bytes[28..32].copy_from_slice(&4096u32.to_le_bytes());
        reseal(&mut bytes);
        assert!(matches!(
            open(&bytes, len),
            Err(FormatError::Layout {
                chunk_bytes: 4096,
                ..
            })
        ));
    }

    #[test]
    fn state_too_large() {
        let (mut bytes, len) = front(&state());
        bytes[16..24].copy_from_slice(&(MAX_STATE_BYTES + 1).to_le_bytes());
        reseal(&mut bytes);
        assert!(matches!(
            open(&bytes, len),
            Err(FormatError::StateTooLarge { .. })
        ));
    }

    #[test]
    fn memory_sizes() {
        for bad in [0, 3, (64 << 20) + 4096, 1 << 62, u64::MAX] {
            let (mut bytes, len) = front(&state());
            bytes[32..40].copy_from_slice(&bad.to_le_bytes());
            bytes[40..48].copy_from_slice(&bad.div_ceil(CHUNK_BYTES).to_le_bytes());
            reseal(&mut bytes);
            assert!(
                matches!(open(&bytes, len), Err(FormatError::MemorySize(_))),
                "{bad}"
            );
        }
        let (mut bytes, len) = front(&state());
        bytes[40..48].copy_from_slice(&(u64::MAX / 4).to_le_bytes());
        reseal(&mut bytes);
        assert!(matches!(
            open(&bytes, len),
            Err(FormatError::ChunkCount { .. })
        ));
    }

    #[test]
    fn file_length_must_match_the_header() {
        let (bytes, len) = front(&state());
        assert!(matches!(
            open(&bytes, len - 1),
            Err(FormatError::ShortFile { .. })
        ));
        assert!(matches!(
            open(&bytes, len + 1),
            Err(FormatError::TrailingBytes { bytes: 1 })
        ));
    }

    #[test]
    fn truncated_parts() {
        let (bytes, len) = front(&state());
        let read = |cut: usize| SnapshotReader::open(&bytes[..cut], len).map(|_| ());
        assert!(matches!(
            read(10),
            Err(FormatError::Truncated { part: "header", .. })
        ));
        assert!(matches!(
            read(HEADER_LEN + 5),
            Err(FormatError::Truncated { part: "state", .. })
        ));
        assert!(matches!(
            read(bytes.len() - 1),
            Err(FormatError::Truncated {
                part: "chunk table",
                ..
            })
        ));
        let (mut reader, _) = SnapshotReader::open(file(&bytes, 1000), len).unwrap();
        assert!(matches!(
            reader.next_chunk(),
            Err(FormatError::Truncated { part: "memory", .. })
        ));
    }

    #[test]
    fn state_checksum_and_encoding() {
        let (mut bytes, len) = front(&state());
        bytes[HEADER_LEN] ^= 1;
        assert!(matches!(open(&bytes, len), Err(FormatError::StateChecksum)));

        // A state that is not JSON, with a matching checksum.
        let json = b"not json".to_vec();
        let header = Header::for_state(&json, MEMORY);
        let mut bytes = header.encode().to_vec();
        bytes.extend_from_slice(&json);
        bytes.extend(std::iter::repeat_n(0u8, header.chunk_count as usize * 4));
        assert!(matches!(
            open(&bytes, header.file_len()),
            Err(FormatError::State(_))
        ));
    }

    #[test]
    fn memory_chunk_checksum() {
        let (mut bytes, len) = front(&state());
        let last = bytes.len() - 1;
        bytes[last] ^= 1;
        let (mut reader, _) = SnapshotReader::open(file(&bytes, MEMORY), len).unwrap();
        let mut index = 0;
        let err = loop {
            match reader.next_chunk() {
                Ok(Some(_)) => index += 1,
                Ok(None) => panic!("no checksum mismatch"),
                Err(err) => break err,
            }
        };
        let last_chunk = MEMORY / CHUNK_BYTES - 1;
        assert_eq!(index, last_chunk);
        assert!(matches!(err, FormatError::ChunkChecksum { index } if index == last_chunk));
    }

    #[test]
    fn states_a_restore_cannot_take_are_refused() {
        let mut mismatched = state();
        mismatched.memory_bytes = 128 << 20;
        let json = mismatched.encode().unwrap();
        let header = Header::for_state(&json, MEMORY);
        let mut bytes = header.encode().to_vec();
        bytes.extend_from_slice(&json);
        bytes.extend(std::iter::repeat_n(0u8, header.chunk_count as usize * 4));
        assert!(matches!(
            open(&bytes, header.file_len()),
            Err(FormatError::MemoryMismatch { .. })
        ));

        let mut no_vcpus = state();
        no_vcpus.vcpus.clear();
        let mut too_many_msrs = state();
        too_many_msrs.vcpus[0].msrs = vec![Default::default(); crate::vcpu::MAX_MSR_ENTRIES + 1];
        let mut too_much_cpuid = state();
        too_much_cpuid.vcpus[0].cpuid =
            vec![Default::default(); crate::vcpu::MAX_CPUID_ENTRIES + 1];
        let mut big_xsave = state();
        big_xsave.vcpus[0].xsave = vec![0; crate::vcpu::XSAVE_WORDS + 1];
        assert!(matches!(
            SnapshotState::decode(&no_vcpus.encode().unwrap()),
            Err(FormatError::VcpuCount(0))
        ));
        for bad in [too_many_msrs, too_much_cpuid, big_xsave] {
            assert!(matches!(
                SnapshotState::decode(&bad.encode().unwrap()),
                Err(FormatError::Vcpu { index: 0, .. })
            ));
        }
    }
}
