use super::*;

/// The structs are the kernel's, byte for byte (include/uapi/linux/fuse.h).
#[test]
fn the_abi_structs_have_the_kernels_sizes() {
    assert_eq!(size_of::<InHeader>(), 40);
    assert_eq!(size_of::<InitIn>(), 64);
    assert_eq!(size_of::<InitOut>(), 64);
    assert_eq!(size_of::<ReadIn>(), 40);
    assert_eq!(size_of::<ReleaseIn>(), 24);
    assert_eq!(size_of::<GetattrIn>(), 16);
    assert_eq!(size_of::<Headers>(), 288);
    assert_eq!(size_of::<EntInOut>(), 32);
    assert_eq!(size_of::<CmdReq>(), 24);
    assert_eq!(std::mem::offset_of!(InitOut, flags2), 32);
    assert_eq!(std::mem::offset_of!(Headers, ring), 256);
}

/// REGISTER's iovec count lands in the SQE's `len`, and nothing else moves.
#[test]
fn an_sqes_len_is_set_in_place() {
    let sqe = opcode::UringCmd80::new(types::Fd(7), cmd::REGISTER)
        .cmd([0xab; 80])
        .addr(Some(0x1122_3344_5566_7788))
        .build()
        .user_data(5);
    let before: [u8; 128] = unsafe { std::mem::transmute(sqe.clone()) };
    let after: [u8; 128] = unsafe { std::mem::transmute(with_len(sqe, 2)) };
    assert_eq!(&after[24..28], &2u32.to_ne_bytes());
    assert_eq!(&after[16..24], &0x1122_3344_5566_7788u64.to_ne_bytes());
    let mut expect = before;
    expect[24..28].copy_from_slice(&2u32.to_ne_bytes());
    assert_eq!(after, expect);
}

/// A private mount refuses other users as fuser's loop does: lookups and listings are
/// refused, what the kernel sends without the caller's uid passes, root always passes.
#[test]
fn a_private_mount_refuses_other_users_as_fuser_does() {
    let me = Some(1000);
    assert!(refused(me, 65534, op::LOOKUP));
    assert!(refused(me, 65534, op::OPENDIR));
    assert!(refused(me, 65534, op::GETATTR));
    assert!(!refused(me, 65534, op::READ));
    assert!(!refused(me, 65534, op::READDIRPLUS));
    assert!(!refused(me, 0, op::LOOKUP));
    assert!(!refused(me, 1000, op::LOOKUP));
    assert!(!refused(None, 65534, op::LOOKUP));
}
