//! `uring`: placeholder, being written.
