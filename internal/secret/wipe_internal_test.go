package secret

import (
	"bytes"
	"runtime"
	"testing"
	"time"
)

// peek returns the slice held by k itself, not a copy.
func peek(k Bytes) []byte {
	var mem []byte
	k.with(func(held []byte) []byte {
		mem = held
		return held
	})
	return mem
}

// TestWipeZeroesInPlace looks behind the handle (this is a white-box test) and
// checks that Wipe overwrites the very memory that held the key, not just
// drops a reference to it.
func TestWipeZeroesInPlace(t *testing.T) {
	key := []byte("KEYMATERIAL-0123456789abcdef-XYZ")
	for _, tc := range []struct {
		name string
		make func() Bytes
	}{
		{"New", func() Bytes { return New(key) }},
		{"Random", func() Bytes {
			k, err := Random(len(key))
			if err != nil {
				t.Fatalf("Random(%d) error = %v, want nil", len(key), err)
			}
			return k
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			k := tc.make()
			mem := peek(k) // shares the backing array with the handle
			if bytes.Equal(mem, make([]byte, len(key))) {
				t.Fatalf("%s: backing memory is already all zero before Wipe", tc.name)
			}
			k.Wipe()
			if want := make([]byte, len(key)); !bytes.Equal(mem, want) {
				t.Errorf("backing memory after Wipe = %x, want %x", mem, want)
			}
			if held := peek(k); held != nil {
				t.Errorf("held bytes after Wipe = %x, want nil", held)
			}
		})
	}
}

// TestCleanupZeroesUnreachable checks the backstop: when the last handle to a
// key becomes unreachable without Wipe, the garbage collector's cleanup zeroes
// the memory.
func TestCleanupZeroesUnreachable(t *testing.T) {
	key := []byte("KEYMATERIAL-0123456789abcdef-XYZ")
	mem := func() []byte {
		return peek(New(key)) // keeps the array alive, but not the buffer
	}()
	want := make([]byte, len(key))
	deadline := time.Now().Add(10 * time.Second)
	for !bytes.Equal(mem, want) {
		if time.Now().After(deadline) {
			t.Fatalf("memory of an unreachable, unwiped key = %q after 10s, want %x", mem, want)
		}
		runtime.GC()
		time.Sleep(time.Millisecond)
	}
}
