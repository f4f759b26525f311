//! defib-controller (being written).
