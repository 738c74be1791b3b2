// Package lockedmem holds key material in memory that the kernel never
// writes to swap or into a core dump.
//
// A [Buffer] is a page-aligned anonymous mapping outside the Go heap. On
// Linux it is locked into RAM (mlock), excluded from core dumps
// (MADV_DONTDUMP) and, where the kernel supports it, wiped in a forked child
// (MADV_WIPEONFORK). The garbage collector never moves or copies it, so the
// key it holds exists in exactly one place until [Buffer.Destroy] zeroes and
// unmaps it. [HardenProcess] complements it for the whole process: no core
// dumps at all, and no ptrace attach by non-root users.
//
// Only Linux is supported; on other systems [New] and [HardenProcess] return
// an error rather than pretending to protect anything.
package lockedmem

import (
	"fmt"
	"io"
	"log/slog"
	"sync"
	"unsafe"
)

// MaxSize is the largest Buffer that [New] makes: 1 MiB. Locked memory is
// limited per process (RLIMIT_MEMLOCK), and keys are small.
const MaxSize = 1 << 20

// Redacted is what every textual rendering of a [Buffer] produces.
const Redacted = "lockedmem.Buffer(REDACTED)"

// Buffer is a region of locked memory for key material, made by [New] and
// released by [Buffer.Destroy].
//
// The methods of a Buffer are safe for concurrent use, but the slice that
// [Buffer.Bytes] returns is not guarded by them: the owner must make sure no
// one uses it once Destroy has been called. The zero value is a Buffer that
// has already been destroyed.
//
// Nothing in a Buffer value reveals the key: its fields hold only the address
// and sizes of the mapping, and fmt and log/slog print [Redacted].
//
// A Buffer that is not destroyed stays mapped and locked until the process
// exits; there is no finalizer, because unmapping memory that a caller may
// still be reading through [Buffer.Bytes] would crash the process.
type Buffer struct {
	mu     sync.Mutex
	base   unsafe.Pointer // start of the mapping; nil once destroyed
	mapped int            // length of the mapping: size rounded up to pages
	size   int            // usable length requested from New
}

// checkSize returns an error unless 1 <= size <= MaxSize.
func checkSize(size int) error {
	if size < 1 || size > MaxSize {
		return fmt.Errorf("lockedmem: invalid size %d, want 1..%d", size, MaxSize)
	}
	return nil
}

// Bytes returns the usable memory of b: a slice of length and capacity
// [Buffer.Size] that aliases the locked mapping. It returns nil once b has
// been destroyed.
//
// Do not retain the slice past [Buffer.Destroy]: after it the memory is
// unmapped and any access crashes the process. Do not append to the slice
// or copy its contents to ordinary memory: the copy would live on the Go
// heap, where it can be swapped, dumped and left behind by the garbage
// collector.
func (b *Buffer) Bytes() []byte {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.base == nil {
		return nil
	}
	return unsafe.Slice((*byte)(b.base), b.size)
}

// Size returns the usable size of b in bytes, as requested from [New], or 0
// once b has been destroyed.
func (b *Buffer) Size() int {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.base == nil {
		return 0
	}
	return b.size
}

// String returns [Redacted].
func (b *Buffer) String() string { return Redacted }

// GoString returns [Redacted], so %#v does not reveal the contents.
func (b *Buffer) GoString() string { return Redacted }

// Format writes [Redacted] for every verb and flag, so no fmt verb (%v, %s,
// %q, %x, %X, %d, ...) reveals the contents.
func (b *Buffer) Format(f fmt.State, _ rune) {
	_, _ = io.WriteString(f, Redacted)
}

// LogValue implements [slog.LogValuer]; it returns [Redacted] as a string.
func (b *Buffer) LogValue() slog.Value { return slog.StringValue(Redacted) }
