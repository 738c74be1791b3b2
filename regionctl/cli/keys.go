package cli

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"

	"github.com/cairnkms/cairn/internal/bundle"
)

// Key file names under keys generate's --out.
const (
	SigningKeyFile = "bundle-signing.key"
	SigningPubFile = "bundle-signing.pub"
)

func keysGenerate(_ context.Context, args []string, stdout, stderr io.Writer) error {
	fs := newFlags("keys generate", stderr)
	out := fs.String("out", "", "directory to write "+SigningKeyFile+" (0600) and "+SigningPubFile+" to (required)")
	if err := parse(fs, args); err != nil {
		return err
	}
	if *out == "" {
		return usageError(fs, "--out is required")
	}
	priv, pub := filepath.Join(*out, SigningKeyFile), filepath.Join(*out, SigningPubFile)
	// Check both first, so an existing public key does not leave a fresh
	// private key behind without its public half.
	for _, p := range []string{priv, pub} {
		if _, err := os.Lstat(p); err == nil {
			return fmt.Errorf("%s exists; refusing to overwrite a signing key", p)
		} else if !errors.Is(err, os.ErrNotExist) {
			return err
		}
	}
	pubKey, privKey, err := bundle.GenerateKey()
	if err != nil {
		return err
	}
	defer clear(privKey)
	if err := bundle.WriteKeys(priv, pub, privKey); err != nil {
		return err
	}
	fmt.Fprintf(stdout, "bundle-signing key %s\nprivate key: %s (mode 0600; keep it offline)\npublic key:  %s (pin it on every KMS server)\n", bundle.KeyID(pubKey), priv, pub)
	return nil
}
