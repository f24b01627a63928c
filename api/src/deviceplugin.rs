//! The kubelet's device plugin API (`k8s.io/kubelet`
//! `pkg/apis/deviceplugin/v1beta1`, generated from
//! `proto/deviceplugin/v1beta1/api.proto`), and the names Sandfork serves
//! through it.

/// Generated gRPC messages, clients and servers of package `v1beta1`
/// (`Registration`, served by the kubelet; `DevicePlugin`, by a plugin).
pub mod v1beta1 {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("v1beta1");

    /// The API version a plugin registers with.
    pub const VERSION: &str = "v1beta1";
    /// The kubelet's device-plugin directory: its socket and the plugins'.
    pub const DEVICE_PLUGIN_PATH: &str = "/var/lib/kubelet/device-plugins/";
    /// Name of the kubelet's Registration socket in that directory.
    pub const KUBELET_SOCKET: &str = "kubelet.sock";
    /// `Device.health` of a device that can be allocated.
    pub const HEALTHY: &str = "Healthy";
    /// `Device.health` of one that cannot.
    pub const UNHEALTHY: &str = "Unhealthy";
}

/// The extended resource the node agent advertises: one unit per sandbox
/// the node may run; a container that asks for it gets `/dev/kvm` and
/// `/dev/userfaultfd`.
pub const KVM_RESOURCE: &str = "sandfork.dev/kvm";
