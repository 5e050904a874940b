//! `fault`: placeholder, being written.
