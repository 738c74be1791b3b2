package distributor

import (
	"fmt"

	"github.com/cairnkms/cairn/internal/lockedmem"
	"github.com/cairnkms/cairn/internal/secret"
	"github.com/cairnkms/cairn/safe"
)

// rootKey is the RMK in one mlocked, never-dumped page outside the Go heap.
// It is the only copy this process keeps; transient copies made to seal it
// for a recipient are wiped at once.
type rootKey struct {
	buf *lockedmem.Buffer
}

// newRootKey copies k into locked memory. The caller still owns k.
func newRootKey(k secret.Bytes) (*rootKey, error) {
	if k.Len() != safe.RMKSize {
		return nil, fmt.Errorf("distributor: root key of %d bytes, want %d", k.Len(), safe.RMKSize)
	}
	buf, err := lockedmem.New(safe.RMKSize)
	if err != nil {
		return nil, fmt.Errorf("distributor: cannot lock memory for the root key: %w", err)
	}
	data := k.Data()
	copy(buf.Bytes(), data)
	clear(data)
	return &rootKey{buf: buf}, nil
}

// secret returns a copy of the key as a secret.Bytes; the caller wipes it.
func (k *rootKey) secret() secret.Bytes { return secret.New(k.buf.Bytes()) }

// wipe zeroes and unmaps the key.
func (k *rootKey) wipe() error { return k.buf.Destroy() }
