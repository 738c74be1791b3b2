package pkcs11safe_test

import (
	"context"
	"fmt"

	"github.com/cairnkms/cairn/safe"
	"github.com/cairnkms/cairn/safe/pkcs11safe"
)

// Open a token, seal a share into it and read it back. (Not run: it needs a
// token; see the package's tests for SoftHSM2 ones.)
func ExampleOpen() {
	ctx := context.Background()
	s, err := pkcs11safe.Open(ctx, pkcs11safe.Config{
		Module:     "/usr/lib/softhsm/libsofthsm2.so",
		TokenLabel: "safe-1",
		PIN:        pkcs11safe.PINSource{File: "/etc/cairn/safe-1.pin"}, // mode 0600
		AttemptDir: "/var/lib/cairn/attempts",
	})
	if err != nil {
		fmt.Println(err) // wraps safe.ErrBadCredential or safe.ErrLocked for PIN trouble
		return
	}
	defer s.Close()

	ref := safe.ShareRef{GenesisID: "00112233445566778899aabbccddeeff", Epoch: 0, Index: 1}
	share, err := s.Unseal(ctx, ref)
	if err != nil {
		fmt.Println(err) // wraps safe.ErrNotFound or safe.ErrTampered
		return
	}
	defer share.Wipe()
	fmt.Println(s.Kind(), s.Label(), share) // the share prints as secret.Bytes(REDACTED)
}
