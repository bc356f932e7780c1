//! Generated protobuf and gRPC types (`proto/`).

pub mod admin {
    pub mod v1 {
        tonic::include_proto!("aigw.admin.v1");
    }
}

pub mod config {
    pub mod v1 {
        tonic::include_proto!("aigw.config.v1");
    }
}

pub mod limits {
    pub mod v1 {
        tonic::include_proto!("aigw.limits.v1");
    }
}

pub mod usage {
    pub mod v1 {
        tonic::include_proto!("aigw.usage.v1");
    }
}

/// Encoded `FileDescriptorSet` of every aigw proto, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("aigw_descriptor");
