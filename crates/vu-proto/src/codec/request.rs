//! Request codes: the [`RequestCode`] newtype that travels in every header, and the
//! [`FrontendReq`] and [`BackendReq`] enums it converts to.
//!
//! The two enums are written out once, as data, by the `requests!` tables below: one row
//! per request, in spec order, giving its code, its spec name (used by `Display`), how
//! many fds it may carry, how many fds its reply may carry, and whether a reply always
//! follows. Everything the codec and the session know about a request's fds and reply
//! comes from that row.

use std::fmt;

/// The `request` field of a vhost-user header, as received.
///
/// It stays a plain number until converted with `TryFrom` into [`FrontendReq`] or
/// [`BackendReq`], so that a request this crate does not know can still be answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RequestCode(pub u32);

impl fmt::Display for RequestCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "request {}", self.0)
    }
}

impl From<u32> for RequestCode {
    fn from(code: u32) -> Self {
        RequestCode(code)
    }
}

/// How many fds a message may carry in its ancillary data: `min..=max`.
///
/// Where the exact count depends on the payload (a memory table carries one fd per
/// region, a vring fd index says whether an fd follows), the row gives the widest range
/// and the typed decoder narrows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FdRule {
    /// The fewest fds allowed.
    pub min: usize,
    /// The most fds allowed.
    pub max: usize,
}

impl FdRule {
    /// No fds at all.
    pub const NONE: FdRule = FdRule { min: 0, max: 0 };
    /// Exactly one fd.
    pub const ONE: FdRule = FdRule { min: 1, max: 1 };
    /// One fd or none (the payload says which).
    pub const OPTIONAL: FdRule = FdRule { min: 0, max: 1 };

    /// Whether `count` fds satisfy the rule.
    pub fn allows(self, count: usize) -> bool {
        (self.min..=self.max).contains(&count)
    }
}

/// When the receiver of a request answers it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplyRule {
    /// The request always has a reply carrying a payload. The spec: for these, "the
    /// presence of `VHOST_USER_PROTOCOL_F_REPLY_ACK` or need_reply bit being set brings
    /// no behavioural change".
    Always,
    /// The request is answered only when the sender set `NEED_REPLY`, which it may do
    /// once `REPLY_ACK` is negotiated; the reply is then a `u64` status.
    OnlyIfNeedReply,
    /// While postcopy listening (after `POSTCOPY_LISTEN`), the back-end answers with
    /// the bases of the regions it mapped, without NEED_REPLY being set; otherwise as
    /// [`ReplyRule::OnlyIfNeedReply`]. Applies to `SET_MEM_TABLE` and `ADD_MEM_REG`.
    PostcopyOrNeedReply,
}

/// What the codec needs to know about a request of either direction to check its
/// reply.
pub trait Request: Copy + Into<RequestCode> + fmt::Display {
    /// How many fds the reply may carry.
    fn reply_fds(self) -> FdRule;
}

/// Shared by both request tables: defines the enum, its conversions and its data rows.
macro_rules! requests {
    (
        $(#[$meta:meta])*
        enum $name:ident;
        $(
            $(#[$vmeta:meta])*
            $variant:ident = $code:literal, $spec:literal, fds $fds:expr, reply_fds $rfds:expr, $reply:ident;
        )*
    ) => {
        $(#[$meta])*
        #[non_exhaustive]
        #[repr(u32)]
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum $name {
            $(
                $(#[$vmeta])*
                $variant = $code,
            )*
        }

        impl $name {
            /// Every request of this direction, in spec order.
            pub const ALL: &'static [$name] = &[$($name::$variant),*];

            /// The request's name as the spec writes it, e.g. `VHOST_USER_GET_FEATURES`.
            pub fn spec_name(self) -> &'static str {
                match self {
                    $($name::$variant => $spec,)*
                }
            }

            /// How many fds the request itself may carry.
            pub fn fd_rule(self) -> FdRule {
                match self {
                    $($name::$variant => $fds,)*
                }
            }

            /// How many fds the reply to the request may carry.
            pub fn reply_fd_rule(self) -> FdRule {
                match self {
                    $($name::$variant => $rfds,)*
                }
            }

            /// When the request is answered.
            pub fn reply_rule(self) -> ReplyRule {
                match self {
                    $($name::$variant => ReplyRule::$reply,)*
                }
            }

            /// The request's code on the wire.
            pub fn code(self) -> RequestCode {
                RequestCode(self as u32)
            }
        }

        impl Request for $name {
            fn reply_fds(self) -> FdRule {
                self.reply_fd_rule()
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.spec_name())
            }
        }

        impl From<$name> for RequestCode {
            fn from(req: $name) -> RequestCode {
                req.code()
            }
        }

        impl TryFrom<RequestCode> for $name {
            /// The code itself, so that the unknown request can still be answered.
            type Error = RequestCode;

            fn try_from(code: RequestCode) -> Result<Self, RequestCode> {
                match code.0 {
                    $($code => Ok($name::$variant),)*
                    _ => Err(code),
                }
            }
        }
    };
}

const NONE: FdRule = FdRule::NONE;
const ONE: FdRule = FdRule::ONE;
const OPTIONAL: FdRule = FdRule::OPTIONAL;
/// A memory table: one fd per region; the decoder checks the count equals `num_regions`.
const PER_REGION: FdRule = FdRule {
    min: 1,
    max: crate::header::MAX_FDS,
};

requests! {
    /// A request the front-end sends to the back-end over the main socket.
    enum FrontendReq;
    /// Asks for the virtio feature bits the back-end offers.
    GetFeatures = 1, "VHOST_USER_GET_FEATURES", fds NONE, reply_fds NONE, Always;
    /// Acknowledges the virtio feature bits the front-end accepts.
    SetFeatures = 2, "VHOST_USER_SET_FEATURES", fds NONE, reply_fds NONE, OnlyIfNeedReply;
    /// Claims the back-end for this session.
    SetOwner = 3, "VHOST_USER_SET_OWNER", fds NONE, reply_fds NONE, OnlyIfNeedReply;
    /// Deprecated; no longer sent by conforming front-ends.
    ResetOwner = 4, "VHOST_USER_RESET_OWNER", fds NONE, reply_fds NONE, OnlyIfNeedReply;
    /// Sets the guest memory table, one fd per region.
    SetMemTable = 5, "VHOST_USER_SET_MEM_TABLE", fds PER_REGION, reply_fds NONE, PostcopyOrNeedReply;
    /// Sets the dirty log area (shared memory passed as an fd).
    SetLogBase = 6, "VHOST_USER_SET_LOG_BASE", fds ONE, reply_fds NONE, Always;
    /// Sets the eventfd used to signal dirty log changes.
    SetLogFd = 7, "VHOST_USER_SET_LOG_FD", fds ONE, reply_fds NONE, OnlyIfNeedReply;
    /// Sets the size of a vring.
    SetVringNum = 8, "VHOST_USER_SET_VRING_NUM", fds NONE, reply_fds NONE, OnlyIfNeedReply;
    /// Sets the addresses of a vring's parts.
    SetVringAddr = 9, "VHOST_USER_SET_VRING_ADDR", fds NONE, reply_fds NONE, OnlyIfNeedReply;
    /// Sets the next available index of a vring.
    SetVringBase = 10, "VHOST_USER_SET_VRING_BASE", fds NONE, reply_fds NONE, OnlyIfNeedReply;
    /// Stops a vring and asks for its next available index.
    GetVringBase = 11, "VHOST_USER_GET_VRING_BASE", fds NONE, reply_fds NONE, Always;
    /// Sets (or, with the no-fd bit, clears) the kick eventfd of a vring.
    SetVringKick = 12, "VHOST_USER_SET_VRING_KICK", fds OPTIONAL, reply_fds NONE, OnlyIfNeedReply;
    /// Sets (or, with the no-fd bit, clears) the call eventfd of a vring.
    SetVringCall = 13, "VHOST_USER_SET_VRING_CALL", fds OPTIONAL, reply_fds NONE, OnlyIfNeedReply;
    /// Sets (or, with the no-fd bit, clears) the error eventfd of a vring.
    SetVringErr = 14, "VHOST_USER_SET_VRING_ERR", fds OPTIONAL, reply_fds NONE, OnlyIfNeedReply;
    /// Asks for the protocol feature bits the back-end offers.
    GetProtocolFeatures = 15, "VHOST_USER_GET_PROTOCOL_FEATURES", fds NONE, reply_fds NONE, Always;
    /// Acknowledges the protocol feature bits the front-end accepts.
    SetProtocolFeatures = 16, "VHOST_USER_SET_PROTOCOL_FEATURES", fds NONE, reply_fds NONE, OnlyIfNeedReply;
    /// Asks how many queues the back-end supports.
    GetQueueNum = 17, "VHOST_USER_GET_QUEUE_NUM", fds NONE, reply_fds NONE, Always;
    /// Enables or disables a vring.
    SetVringEnable = 18, "VHOST_USER_SET_VRING_ENABLE", fds NONE, reply_fds NONE, OnlyIfNeedReply;
    /// Asks a net back-end to broadcast a RARP for a MAC address.
    SendRarp = 19, "VHOST_USER_SEND_RARP", fds NONE, reply_fds NONE, OnlyIfNeedReply;
    /// Tells a net back-end the MTU.
    NetSetMtu = 20, "VHOST_USER_NET_SET_MTU", fds NONE, reply_fds NONE, OnlyIfNeedReply;
    /// Hands the back-end the socket for back-end-initiated requests.
    SetBackendReqFd = 21, "VHOST_USER_SET_BACKEND_REQ_FD", fds ONE, reply_fds NONE, OnlyIfNeedReply;
    /// Sends an IOTLB update or invalidation. The spec lists a `u64` reply, but QEMU
    /// waits for it only when it set NEED_REPLY, so that is the rule here.
    IotlbMsg = 22, "VHOST_USER_IOTLB_MSG", fds NONE, reply_fds NONE, OnlyIfNeedReply;
    /// Sets the endianness of a legacy vring.
    SetVringEndian = 23, "VHOST_USER_SET_VRING_ENDIAN", fds NONE, reply_fds NONE, OnlyIfNeedReply;
    /// Reads device config space.
    GetConfig = 24, "VHOST_USER_GET_CONFIG", fds NONE, reply_fds NONE, Always;
    /// Writes device config space.
    SetConfig = 25, "VHOST_USER_SET_CONFIG", fds NONE, reply_fds NONE, OnlyIfNeedReply;
    /// Creates a crypto session.
    CreateCryptoSession = 26, "VHOST_USER_CREATE_CRYPTO_SESSION", fds NONE, reply_fds NONE, Always;
    /// Closes a crypto session.
    CloseCryptoSession = 27, "VHOST_USER_CLOSE_CRYPTO_SESSION", fds NONE, reply_fds NONE, OnlyIfNeedReply;
    /// Asks the back-end for a userfaultfd for postcopy migration.
    PostcopyAdvise = 28, "VHOST_USER_POSTCOPY_ADVISE", fds NONE, reply_fds ONE, Always;
    /// Tells the back-end postcopy listening starts.
    PostcopyListen = 29, "VHOST_USER_POSTCOPY_LISTEN", fds NONE, reply_fds NONE, OnlyIfNeedReply;
    /// Tells the back-end postcopy has ended.
    PostcopyEnd = 30, "VHOST_USER_POSTCOPY_END", fds NONE, reply_fds NONE, Always;
    /// Asks the back-end for a shared inflight buffer.
    GetInflightFd = 31, "VHOST_USER_GET_INFLIGHT_FD", fds NONE, reply_fds ONE, Always;
    /// Hands the back-end a shared inflight buffer.
    SetInflightFd = 32, "VHOST_USER_SET_INFLIGHT_FD", fds ONE, reply_fds NONE, OnlyIfNeedReply;
    /// Hands a GPU back-end its display socket.
    GpuSetSocket = 33, "VHOST_USER_GPU_SET_SOCKET", fds ONE, reply_fds NONE, OnlyIfNeedReply;
    /// Resets the device.
    ResetDevice = 34, "VHOST_USER_RESET_DEVICE", fds NONE, reply_fds NONE, OnlyIfNeedReply;
    /// An in-band kick of a vring.
    VringKick = 35, "VHOST_USER_VRING_KICK", fds NONE, reply_fds NONE, OnlyIfNeedReply;
    /// Asks how many memory slots the back-end supports.
    GetMaxMemSlots = 36, "VHOST_USER_GET_MAX_MEM_SLOTS", fds NONE, reply_fds NONE, Always;
    /// Adds one memory region.
    AddMemReg = 37, "VHOST_USER_ADD_MEM_REG", fds ONE, reply_fds NONE, PostcopyOrNeedReply;
    /// Removes one memory region. The spec: "For compatibility with existing incorrect
    /// implementations, the back-end MAY accept messages with one file descriptor. If a
    /// file descriptor is passed, the back-end MUST close it"; so one fd is allowed.
    RemMemReg = 38, "VHOST_USER_REM_MEM_REG", fds OPTIONAL, reply_fds NONE, OnlyIfNeedReply;
    /// Sets the virtio device status byte.
    SetStatus = 39, "VHOST_USER_SET_STATUS", fds NONE, reply_fds NONE, OnlyIfNeedReply;
    /// Reads the virtio device status byte.
    GetStatus = 40, "VHOST_USER_GET_STATUS", fds NONE, reply_fds NONE, Always;
    /// Asks the back-end for the fd of a shared object by UUID.
    GetSharedObject = 41, "VHOST_USER_GET_SHARED_OBJECT", fds NONE, reply_fds OPTIONAL, Always;
    /// Starts a device state transfer over a pipe.
    SetDeviceStateFd = 42, "VHOST_USER_SET_DEVICE_STATE_FD", fds ONE, reply_fds OPTIONAL, Always;
    /// Asks whether the last device state transfer succeeded.
    CheckDeviceState = 43, "VHOST_USER_CHECK_DEVICE_STATE", fds NONE, reply_fds NONE, Always;
    /// Asks for the sizes of the back-end's shared memory regions.
    GetShmemConfig = 44, "VHOST_USER_GET_SHMEM_CONFIG", fds NONE, reply_fds NONE, Always;
}

requests! {
    /// A request the back-end sends to the front-end over the back-end channel.
    enum BackendReq;
    /// Asks the front-end for an IOTLB translation, or reports an access failure.
    IotlbMsg = 1, "VHOST_USER_BACKEND_IOTLB_MSG", fds NONE, reply_fds NONE, OnlyIfNeedReply;
    /// Tells the front-end the device config space changed.
    ConfigChangeMsg = 2, "VHOST_USER_BACKEND_CONFIG_CHANGE_MSG", fds NONE, reply_fds NONE, OnlyIfNeedReply;
    /// Hands the front-end (or withdraws) a host notifier area for a vring.
    VringHostNotifierMsg = 3, "VHOST_USER_BACKEND_VRING_HOST_NOTIFIER_MSG", fds OPTIONAL, reply_fds NONE, OnlyIfNeedReply;
    /// An in-band call of a vring.
    VringCall = 4, "VHOST_USER_BACKEND_VRING_CALL", fds NONE, reply_fds NONE, OnlyIfNeedReply;
    /// An in-band error notification of a vring.
    VringErr = 5, "VHOST_USER_BACKEND_VRING_ERR", fds NONE, reply_fds NONE, OnlyIfNeedReply;
    /// Adds a shared object to the front-end's lookup table.
    SharedObjectAdd = 6, "VHOST_USER_BACKEND_SHARED_OBJECT_ADD", fds NONE, reply_fds NONE, OnlyIfNeedReply;
    /// Removes a shared object from the front-end's lookup table.
    SharedObjectRemove = 7, "VHOST_USER_BACKEND_SHARED_OBJECT_REMOVE", fds NONE, reply_fds NONE, OnlyIfNeedReply;
    /// Asks the front-end for the fd of a shared object by UUID.
    SharedObjectLookup = 8, "VHOST_USER_BACKEND_SHARED_OBJECT_LOOKUP", fds NONE, reply_fds OPTIONAL, Always;
    /// Asks the front-end to map part of an fd into a shared memory region.
    ShmemMap = 9, "VHOST_USER_BACKEND_SHMEM_MAP", fds ONE, reply_fds NONE, OnlyIfNeedReply;
    /// Asks the front-end to unmap part of a shared memory region.
    ShmemUnmap = 10, "VHOST_USER_BACKEND_SHMEM_UNMAP", fds NONE, reply_fds NONE, OnlyIfNeedReply;
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn frontend_codes_are_dense_and_in_spec_order() {
        for (i, req) in FrontendReq::ALL.iter().enumerate() {
            assert_eq!(req.code().0 as usize, i + 1, "{req}");
        }
        assert_eq!(FrontendReq::ALL.len(), 44);
    }

    #[test]
    fn backend_codes_are_dense_and_in_spec_order() {
        for (i, req) in BackendReq::ALL.iter().enumerate() {
            assert_eq!(req.code().0 as usize, i + 1, "{req}");
        }
        assert_eq!(BackendReq::ALL.len(), 10);
    }

    #[test]
    fn code_round_trips_through_request_code() {
        for &req in FrontendReq::ALL {
            assert_eq!(FrontendReq::try_from(RequestCode::from(req)), Ok(req));
        }
        for &req in BackendReq::ALL {
            assert_eq!(BackendReq::try_from(RequestCode::from(req)), Ok(req));
        }
    }

    #[test]
    fn unknown_code_is_returned_as_the_error() {
        assert_eq!(FrontendReq::try_from(RequestCode(0)), Err(RequestCode(0)));
        assert_eq!(FrontendReq::try_from(RequestCode(45)), Err(RequestCode(45)));
        assert_eq!(BackendReq::try_from(RequestCode(11)), Err(RequestCode(11)));
    }

    #[test]
    fn display_is_the_spec_name() {
        assert_eq!(
            FrontendReq::GetFeatures.to_string(),
            "VHOST_USER_GET_FEATURES"
        );
        assert_eq!(
            BackendReq::ShmemUnmap.to_string(),
            "VHOST_USER_BACKEND_SHMEM_UNMAP"
        );
    }

    #[test]
    fn fd_rules_are_as_the_spec_says() {
        assert_eq!(
            FrontendReq::SetMemTable.fd_rule(),
            FdRule { min: 1, max: 8 }
        );
        assert_eq!(FrontendReq::SetVringKick.fd_rule(), FdRule::OPTIONAL);
        assert_eq!(FrontendReq::AddMemReg.fd_rule(), FdRule::ONE);
        assert_eq!(FrontendReq::GetFeatures.fd_rule(), FdRule::NONE);
        assert_eq!(FrontendReq::GetInflightFd.reply_fd_rule(), FdRule::ONE);
        assert_eq!(BackendReq::ShmemMap.fd_rule(), FdRule::ONE);
        assert_eq!(
            BackendReq::SharedObjectLookup.reply_fd_rule(),
            FdRule::OPTIONAL
        );
    }

    #[test]
    fn fd_rule_allows_its_range_only() {
        assert!(FdRule::OPTIONAL.allows(0));
        assert!(FdRule::OPTIONAL.allows(1));
        assert!(!FdRule::OPTIONAL.allows(2));
        assert!(!FdRule::ONE.allows(0));
    }
}
