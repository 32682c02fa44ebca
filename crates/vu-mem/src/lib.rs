//! Guest memory for vhost-user backends.
//!
//! # What this crate is
//!
//! The backend's view of guest memory, built from the regions the frontend describes in
//! `SET_MEM_TABLE`, `ADD_MEM_REG` and `REM_MEM_REG`:
//!
//! - each region mapped from its fd at its offset, MAP_SHARED, after checking sizes, overflows,
//!   overlaps (guest and VMM addresses) and a slot limit ([`DEFAULT_SLOT_LIMIT`], 509);
//! - every table change published as a new snapshot in a vm-memory
//!   [`GuestMemoryAtomic`](vm_memory::GuestMemoryAtomic), so readers keep a consistent view;
//! - translation of the frontend's VMM user addresses (ring addresses arrive in that form) to
//!   guest addresses, by binary search, checking the whole range lies in one region;
//! - the dirty-page log for live migration (`SET_LOG_BASE`, `SET_LOG_FD`, `VHOST_F_LOG_ALL`),
//!   fed by every write device code makes through `GuestMemory`: each region carries a
//!   [`LogBitmap`], vm-memory's [`Bitmap`](vm_memory::bitmap::Bitmap) hook;
//! - the device IOTLB ([`Iotlb`]) of a backend behind a virtual IOMMU: IOVA ranges mapped
//!   to VMM user addresses with permissions, filled by `IOTLB_MSG` updates and invalidations;
//! - with feature `xen`, Xen foreign and grant mappings (vm-memory's `xen` feature);
//! - for the other side, [`SharedMemory`]: guest memory as a frontend (or a test kit playing
//!   the guest) creates it, a memfd mapped in this process, without `unsafe` for its user.
//!
//! # What it is not
//!
//! It knows nothing of the wire protocol: the daemon decodes messages and hands this crate
//! plain [`RegionSpec`]s and numbers. It spawns no threads, reads no sockets, and does not
//! decide what an error means for the peer.
//!
//! # Order of calls
//!
//! 1. The user builds a `GuestMemoryAtomic::new(GuestMemoryMmap::new())`; the daemon makes a
//!    [`GuestMemoryManager::new`] from it (or [`with_slot_limit`](GuestMemoryManager::with_slot_limit))
//!    and hands [`memory()`](GuestMemoryManager::memory) to the backend and the vrings.
//! 2. `GET_MAX_MEM_SLOTS` → [`slot_limit`](GuestMemoryManager::slot_limit);
//!    `SET_MEM_TABLE` → [`set_table`](GuestMemoryManager::set_table);
//!    `ADD_MEM_REG` / `REM_MEM_REG` → [`add_region`](GuestMemoryManager::add_region) /
//!    [`remove_region`](GuestMemoryManager::remove_region).
//! 3. `SET_VRING_ADDR` → [`vmm_to_guest`](GuestMemoryManager::vmm_to_guest) for each ring
//!    address.
//! 4. Migration: `SET_LOG_BASE` → [`set_log_base`](GuestMemoryManager::set_log_base);
//!    `SET_LOG_FD` → [`set_log_fd`](GuestMemoryManager::set_log_fd); `SET_FEATURES` with or
//!    without `VHOST_F_LOG_ALL` → [`set_logging`](GuestMemoryManager::set_logging). Writes
//!    through guest memory are then logged by themselves; ring code marks used-ring writes
//!    of rings with `VHOST_VRING_F_LOG` at their `log_guest_addr` with
//!    [`DirtyLog::mark_dirty`] and calls [`DirtyLog::notify_changed`] once per batch.
//!    Postcopy splits a table change in two: [`prepare_table`](GuestMemoryManager::prepare_table)
//!    (or [`prepare_add_region`](GuestMemoryManager::prepare_add_region)) maps the regions
//!    without publishing them, so they can be registered with the userfaultfd, and
//!    [`publish`](GuestMemoryManager::publish) makes them visible once the frontend
//!    acknowledged their addresses.
//! 5. `RESET_OWNER` or disconnect → [`reset`](GuestMemoryManager::reset).
//!
//! # Why the bitmap is generic, and what it may be
//!
//! [`GuestMemoryManager<B>`] takes any `B:` [`RegionBitmap`], by default [`LogBitmap`]. The
//! daemon and its user name the memory type (`GuestMemoryMmap<B>`) in their own signatures,
//! so `B` has to be a parameter somewhere; `()` gives a backend without migration support
//! and no per-write cost at all, and a device that wants its own tracking as well can write a
//! bitmap that also forwards to the shared [`DirtyLog`]. `RegionBitmap` adds a constant,
//! [`LOGS_WRITES`](RegionBitmap::LOGS_WRITES) (the daemon offers live migration only when
//! it is true), and one method to vm-memory's `NewBitmap`: vm-memory creates bitmaps knowing only a length (in Xen mode
//! there is no other way), so the manager binds each one to its region's guest address and
//! the log after mapping and before publishing.

// `unsafe` is allowed in `sys` alone (raw system calls behind safe functions).
#![deny(unsafe_code)]

mod dirty;
mod error;
mod iotlb;
mod manager;
mod region;
mod shared;
// The one module allowed `unsafe`: the crate's raw system calls behind safe functions.
#[allow(unsafe_code)]
mod sys;

pub use dirty::{log_size_for, DirtyLog, LogBitmap, LogSlice, RegionBitmap, LOG_PAGE_SIZE};
pub use error::{AddressSpace, MemError};
pub use iotlb::{
    Iotlb, IotlbError, IotlbFault, IotlbMapping, ResolveError, SharedIotlb, DEFAULT_IOTLB_ENTRIES,
};
pub use manager::{GuestMemoryManager, PendingTable, DEFAULT_SIZE_LIMIT, DEFAULT_SLOT_LIMIT};
pub use region::RegionSpec;
#[cfg(feature = "xen")]
pub use region::XenMapping;
pub use shared::SharedMemory;
pub use vm_memory::Permissions;

#[cfg(test)]
mod testutil;
