//! Generates the gRPC service of the Open Inference Protocol from `proto/grpc_service.proto`
//! with a pure-Rust protobuf compiler (protox), so building needs no `protoc`.

fn main() {
    let proto = "proto/grpc_service.proto";
    println!("cargo:rerun-if-changed={proto}");
    let fds = match protox::compile([proto], ["proto"]) {
        Ok(fds) => fds,
        Err(e) => {
            eprintln!("error: cannot compile {proto}: {e}");
            std::process::exit(1);
        }
    };
    // Requests are scanned before prost decodes them (`src/grpc_budget.rs`).
    if let Err(e) = tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .codec_path("crate::grpc_budget::BoundedCodec")
        .compile_fds(fds)
    {
        eprintln!("error: cannot generate the gRPC service from {proto}: {e}");
        std::process::exit(1);
    }
}
