//! Protobuf definitions (`rrt.v1`) and the generated tonic code. Built in issue D; generated
//! code stays inside this crate and is never committed.
