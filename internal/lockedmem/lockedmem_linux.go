package lockedmem

import (
	"errors"
	"fmt"
	"unsafe"

	"golang.org/x/sys/unix"
)

// New returns a Buffer of size usable bytes, all zero. size must be between
// 1 and [MaxSize]; the mapping behind it is size rounded up to whole pages.
//
// The memory is an anonymous private mapping, locked into RAM with mlock,
// marked MADV_DONTDUMP so that core dumps leave it out, and marked
// MADV_WIPEONFORK where the kernel supports it (Linux 4.14 and later) so that
// a forked child sees zeroes. New fails if the memory cannot be locked: the
// usual cause is RLIMIT_MEMLOCK, which a systemd unit raises with
// LimitMEMLOCK= (CAP_IPC_LOCK lifts it).
//
// The caller must call [Buffer.Destroy] when the key is no longer needed.
func New(size int) (*Buffer, error) {
	if err := checkSize(size); err != nil {
		return nil, err
	}
	page := unix.Getpagesize()
	mapped := (size + page - 1) / page * page
	base, err := unix.MmapPtr(-1, 0, nil, uintptr(mapped),
		unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS)
	if err != nil {
		return nil, fmt.Errorf("lockedmem: mmap %d bytes: %w", mapped, err)
	}
	mem := unsafe.Slice((*byte)(base), mapped)
	fail := func(err error) (*Buffer, error) {
		if uerr := unix.MunmapPtr(base, uintptr(mapped)); uerr != nil {
			err = errors.Join(err, fmt.Errorf("lockedmem: munmap: %w", uerr))
		}
		return nil, err
	}
	if err := unix.Madvise(mem, unix.MADV_DONTDUMP); err != nil {
		return fail(fmt.Errorf("lockedmem: madvise(MADV_DONTDUMP): %w", err))
	}
	// MADV_WIPEONFORK is best effort: kernels before 4.14 reject it with
	// EINVAL. Any other error is unexpected and reported.
	if err := unix.Madvise(mem, unix.MADV_WIPEONFORK); err != nil && !errors.Is(err, unix.EINVAL) {
		return fail(fmt.Errorf("lockedmem: madvise(MADV_WIPEONFORK): %w", err))
	}
	if err := unix.Mlock(mem); err != nil {
		return fail(fmt.Errorf("lockedmem: mlock %d bytes: %w "+
			"(locked memory is limited by RLIMIT_MEMLOCK: raise it, e.g. with LimitMEMLOCK= in the systemd unit, or grant CAP_IPC_LOCK)",
			mapped, err))
	}
	return &Buffer{base: base, mapped: mapped, size: size}, nil
}

// Destroy zeroes the memory of b, unlocks and unmaps it. Afterwards
// [Buffer.Bytes] returns nil and [Buffer.Size] returns 0. Destroy is safe to
// call more than once and on the zero value; only the first call does
// anything. Slices returned earlier by Bytes must not be used afterwards.
//
// The memory is zeroed even if unlocking or unmapping then fails, and b
// counts as destroyed either way; the error reports what failed.
func (b *Buffer) Destroy() error {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.base == nil {
		return nil
	}
	mem := unsafe.Slice((*byte)(b.base), b.mapped)
	clear(mem)
	var errs []error
	if err := unix.Munlock(mem); err != nil {
		errs = append(errs, fmt.Errorf("lockedmem: munlock: %w", err))
	}
	if err := unix.MunmapPtr(b.base, uintptr(b.mapped)); err != nil {
		errs = append(errs, fmt.Errorf("lockedmem: munmap: %w", err))
	}
	b.base, b.mapped, b.size = nil, 0, 0
	return errors.Join(errs...)
}

// HardenProcess turns off core dumps for the whole process and stops users
// other than root from attaching to it with ptrace or reading its memory
// through /proc. It sets RLIMIT_CORE to 0 (soft and hard limit, so it cannot
// be raised again without CAP_SYS_RESOURCE) and calls
// prctl(PR_SET_DUMPABLE, 0). Call it early in main of every binary that
// holds root key material. It attempts both steps and returns the errors of
// those that failed, joined, or nil.
//
// The process stays non-dumpable until it calls execve; note that a
// non-dumpable process's /proc/<pid> files are owned by root.
func HardenProcess() error {
	var errs []error
	if err := unix.Setrlimit(unix.RLIMIT_CORE, &unix.Rlimit{Cur: 0, Max: 0}); err != nil {
		errs = append(errs, fmt.Errorf("lockedmem: setrlimit(RLIMIT_CORE, 0): %w", err))
	}
	if err := unix.Prctl(unix.PR_SET_DUMPABLE, 0, 0, 0, 0); err != nil {
		errs = append(errs, fmt.Errorf("lockedmem: prctl(PR_SET_DUMPABLE, 0): %w", err))
	}
	return errors.Join(errs...)
}
