//! Compiles the etcd v3 protos (`src/etcd/proto/`) with protox, a pure-Rust protobuf compiler,
//! so the ordinary build needs only cargo (no protoc). The encoded descriptor set is also written
//! to `OUT_DIR/etcd_descriptor.bin`: the JSON gateway uses it to map JSON to protobuf and back.

use prost::Message;

fn main() {
    let dir = "src/etcd/proto";
    println!("cargo:rerun-if-changed={dir}");
    let protos = ["rpc.proto", "v3lock.proto", "v3election.proto"].map(|p| format!("{dir}/{p}"));
    let fds = protox::compile(protos, [dir])
        .unwrap_or_else(|e| panic!("the etcd protos in {dir} do not compile: {e}"));
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    std::fs::write(out.join("etcd_descriptor.bin"), fds.encode_to_vec())
        .expect("cannot write etcd_descriptor.bin to OUT_DIR");
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .compile_fds(fds)
        .expect("tonic code generation for the etcd protos failed");
}
