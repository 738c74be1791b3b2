package lockedmem_test

import (
	"crypto/rand"
	"fmt"

	"github.com/cairnkms/cairn/internal/lockedmem"
)

func Example() {
	// A binary holding root keys first calls lockedmem.HardenProcess in
	// main (not shown here: it would change the test process).

	// One locked, non-dumpable region for a 32-byte root key.
	key, err := lockedmem.New(32)
	if err != nil {
		fmt.Println(err)
		return
	}
	defer func() {
		if err := key.Destroy(); err != nil {
			fmt.Println(err)
		}
	}()

	// Fill it in place: the key never exists on the Go heap.
	if _, err := rand.Read(key.Bytes()); err != nil {
		fmt.Println(err)
		return
	}
	fmt.Println(key, key.Size())
	// Output: lockedmem.Buffer(REDACTED) 32
}
