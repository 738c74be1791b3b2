// Package secret holds key material in a type that does not leak it.
//
// A [Bytes] value can only be read by copying its contents out with
// [Bytes.Data]. Every way of printing, logging or serialising it (fmt verbs,
// log/slog, encoding/json, encoding/xml, encoding/gob, go-cmp reports) yields
// a fixed redaction marker or an error, never the bytes or their length.
// [Bytes.Wipe] zeroes the bytes in place, and every copy of the value sees the
// wipe.
package secret

import (
	"crypto/rand"
	"crypto/subtle"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"runtime"
)

// Redacted is what every textual rendering of a [Bytes] value produces.
const Redacted = "secret.Bytes(REDACTED)"

// ErrSerialize is returned by the Marshal methods of [Bytes]: key material is
// never serialised implicitly. To persist a key, copy it out with
// [Bytes.Data], wrap it (encrypt it) and store the result.
var ErrSerialize = errors.New("secret: refusing to serialise key material")

// Bytes holds key material.
//
// The zero value holds nothing. A Bytes value is a handle: copies of the value
// share the same underlying bytes, so [Bytes.Wipe] on any copy wipes them for
// all copies. Bytes is safe for concurrent use by multiple goroutines.
//
// Bytes is deliberately not comparable with ==, which would compare handles
// rather than contents; use [Bytes.Equal].
type Bytes struct {
	_ [0]func() // not comparable
	p *buffer
}

// buffer is the shared, mutable storage behind a Bytes value.
//
// The bytes are kept in a channel of capacity one, which is also the lock
// that guards them: a goroutine owns the bytes between receiving them from
// slot and sending them back. The channel is not only a lock. Reflection-based
// printers print struct fields without calling their methods, and fmt even
// dereferences a nested pointer when it reports a bad verb
// ("%!s(*secret.buffer=&{...})"), and go-cmp dumps a pointer's target when two
// values have the same String. All of them print a channel as an address
// only, so the bytes are not reachable by printing a Bytes that sits in an
// unexported field of another struct.
type buffer struct {
	slot chan []byte // holds nil once wiped
}

// New returns a Bytes holding a copy of b. The caller keeps ownership of b
// and should clear it (for example with the clear builtin) once it is no
// longer needed. New of an empty or nil slice returns a Bytes that holds
// nothing ([Bytes.IsZero] reports true).
func New(b []byte) Bytes {
	if len(b) == 0 {
		return Bytes{}
	}
	return newBytes(append(make([]byte, 0, len(b)), b...))
}

// Random returns a Bytes holding n bytes read from crypto/rand. It returns an
// error if n is not positive.
func Random(n int) (Bytes, error) {
	if n <= 0 {
		return Bytes{}, fmt.Errorf("secret: invalid length %d, want > 0", n)
	}
	b := make([]byte, n)
	if _, err := rand.Read(b); err != nil {
		clear(b)
		return Bytes{}, fmt.Errorf("secret: read random bytes: %w", err)
	}
	return newBytes(b), nil
}

// newBytes takes ownership of b. A cleanup zeroes b when the last copy of the
// returned value becomes unreachable, in case the owner forgets to call Wipe;
// it is a backstop, not a substitute for Wipe.
func newBytes(b []byte) Bytes {
	p := &buffer{slot: make(chan []byte, 1)}
	p.slot <- b
	runtime.AddCleanup(p, func(b []byte) { clear(b) }, b)
	return Bytes{p: p}
}

// with runs f with exclusive access to the held bytes (nil if none). f may
// not retain them.
func (b Bytes) with(f func(held []byte) (keep []byte)) {
	if b.p == nil {
		f(nil)
		return
	}
	held := <-b.p.slot
	defer func() { b.p.slot <- held }()
	held = f(held)
}

// Data returns a fresh copy of the key material, or nil if b holds nothing.
// The caller owns the copy and must clear it (for example with the clear
// builtin) as soon as it is no longer needed; [Bytes.Wipe] cannot reach it.
func (b Bytes) Data() []byte {
	var out []byte
	b.with(func(held []byte) []byte {
		if len(held) > 0 {
			out = append(make([]byte, 0, len(held)), held...)
		}
		return held
	})
	return out
}

// Len returns the number of bytes held, 0 after [Bytes.Wipe]. The length of
// a key is not secret.
func (b Bytes) Len() int {
	var n int
	b.with(func(held []byte) []byte {
		n = len(held)
		return held
	})
	return n
}

// IsZero reports whether b holds nothing: it is the zero value, was made from
// an empty slice, or has been wiped.
func (b Bytes) IsZero() bool {
	return b.Len() == 0
}

// Equal reports whether b and o hold the same bytes. The comparison of the
// contents takes time independent of the contents; the lengths are compared
// first and are not treated as secret.
//
// A Bytes that holds nothing (zero value or wiped) is equal to nothing, not
// even to another empty Bytes or to itself: a wiped key must never pass a
// comparison.
func (b Bytes) Equal(o Bytes) bool {
	// Snapshot o first and give its bytes back before taking b's, so that two
	// goroutines comparing a with b and b with a cannot deadlock, and so that
	// b.Equal(b) works.
	other := o.Data()
	defer clear(other)
	var eq bool
	b.with(func(held []byte) []byte {
		eq = len(held) > 0 && len(held) == len(other) &&
			subtle.ConstantTimeCompare(held, other) == 1
		return held
	})
	return eq
}

// Wipe zeroes the bytes in place and drops them. Afterwards every copy of b
// holds nothing: Len returns 0, IsZero returns true and Data returns nil.
// Wipe is safe to call more than once and on the zero value. Copies handed
// out earlier by [Bytes.Data] are not affected; their owners must clear them.
func (b Bytes) Wipe() {
	b.with(func(held []byte) []byte {
		clear(held)
		return nil
	})
}

// String returns [Redacted].
func (Bytes) String() string { return Redacted }

// GoString returns [Redacted], so %#v does not reveal the bytes.
func (Bytes) GoString() string { return Redacted }

// Format writes [Redacted] for every verb and flag, so no fmt verb (%v, %s,
// %q, %x, %X, %d, ...) reveals the bytes or their length.
func (Bytes) Format(f fmt.State, _ rune) {
	_, _ = io.WriteString(f, Redacted)
}

// LogValue implements [slog.LogValuer]; it returns [Redacted] as a string.
func (Bytes) LogValue() slog.Value { return slog.StringValue(Redacted) }

// MarshalJSON refuses to serialise the key material; it returns
// [ErrSerialize].
func (Bytes) MarshalJSON() ([]byte, error) { return nil, ErrSerialize }

// MarshalText refuses to serialise the key material; it returns
// [ErrSerialize].
func (Bytes) MarshalText() ([]byte, error) { return nil, ErrSerialize }

// MarshalBinary refuses to serialise the key material (it also stops
// encoding/gob); it returns [ErrSerialize].
func (Bytes) MarshalBinary() ([]byte, error) { return nil, ErrSerialize }
