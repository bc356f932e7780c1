//! In-process pipeline tests (filled below).
