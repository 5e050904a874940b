//! Point-in-time view: placeholder, being written.
