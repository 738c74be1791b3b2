package pkcs11safe

import (
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/cairnkms/cairn/internal/secret"
)

// Defaults for zero Config fields.
const (
	DefaultKeyLabel    = "cairn-share-key"
	DefaultMaxSessions = 4
)

// maxLabelLen is the size of a PKCS#11 token label field (CK_TOKEN_INFO).
const maxLabelLen = 32

// maxPINFileSize bounds what is read from a PIN file; PINs are short.
const maxPINFileSize = 1024

// Config says which token a Safe uses and how it logs in. The zero values of
// the optional fields mean the documented defaults.
type Config struct {
	// Module is the absolute path of the PKCS#11 library. A relative path
	// is refused: a library is never loaded through the search path.
	Module string
	// TokenLabel finds the token. Tokens are always found by label, never
	// by slot number (SoftHSM2 gives each token a random slot id).
	TokenLabel string
	// PIN is where the user PIN comes from.
	PIN PINSource
	// KeyLabel is the label of the AES-256 sealing key on the token; it is
	// generated on the token at the first Open. Default DefaultKeyLabel.
	KeyLabel string
	// MaxSessions bounds the sessions the Safe keeps open, and so the
	// operations it runs at once. Default DefaultMaxSessions.
	MaxSessions int
	// AttemptDir holds the failed-PIN counter (see safe.AttemptLimiter).
	// Required: the counter must outlive the process.
	AttemptDir string
	// MaxAttempts failed logins in a row lock the safe for Cooldown. Zero
	// means safe.DefaultMaxAttempts and safe.DefaultCooldown.
	MaxAttempts int
	Cooldown    time.Duration
	// Now is the clock of the attempt limiter; nil means time.Now.
	Now func() time.Time
}

// Validate reports the first problem with c.
func (c Config) Validate() error {
	switch {
	case c.Module == "":
		return errors.New("pkcs11safe: config: Module (the PKCS#11 library path) is required")
	case !filepath.IsAbs(c.Module):
		return fmt.Errorf("pkcs11safe: config: Module %q is not an absolute path (libraries are never loaded from the search path)", c.Module)
	case c.TokenLabel == "":
		return errors.New("pkcs11safe: config: TokenLabel is required")
	case len(c.TokenLabel) > maxLabelLen:
		return fmt.Errorf("pkcs11safe: config: TokenLabel %q is longer than %d bytes", c.TokenLabel, maxLabelLen)
	case strings.TrimRight(c.TokenLabel, " ") != c.TokenLabel:
		return fmt.Errorf("pkcs11safe: config: TokenLabel %q ends in a space (PKCS#11 pads labels with spaces)", c.TokenLabel)
	case c.MaxSessions < 0:
		return fmt.Errorf("pkcs11safe: config: MaxSessions %d is negative", c.MaxSessions)
	case c.MaxAttempts < 0:
		return fmt.Errorf("pkcs11safe: config: MaxAttempts %d is negative", c.MaxAttempts)
	case c.Cooldown < 0:
		return fmt.Errorf("pkcs11safe: config: Cooldown %v is negative", c.Cooldown)
	case c.AttemptDir == "":
		return errors.New("pkcs11safe: config: AttemptDir (where failed PIN attempts are counted) is required")
	}
	return c.PIN.validate()
}

// withDefaults returns c with its zero optional fields set.
func (c Config) withDefaults() Config {
	if c.KeyLabel == "" {
		c.KeyLabel = DefaultKeyLabel
	}
	if c.MaxSessions == 0 {
		c.MaxSessions = DefaultMaxSessions
	}
	return c
}

// PINSource says where the user PIN comes from: exactly one of File, Env
// and Prompt is set. There is deliberately no way to pass a PIN as a string
// (it would end up on a command line, in shell history and in ps output).
type PINSource struct {
	// File is the path of a file holding the PIN. It must be a regular file
	// with no group or other permissions (0600 or 0400); one trailing
	// newline is trimmed.
	File string
	// Env is the name of an environment variable holding the PIN. Prefer
	// File or Prompt: a process's environment is readable through /proc by
	// its user and is inherited by its children.
	Env string
	// Prompt asks for the PIN interactively (say, with golang.org/x/term's
	// ReadPassword). The Safe wipes what it returns.
	Prompt func() (secret.Bytes, error)
}

func (p PINSource) validate() error {
	n := 0
	for _, set := range []bool{p.File != "", p.Env != "", p.Prompt != nil} {
		if set {
			n++
		}
	}
	switch n {
	case 0:
		return errors.New("pkcs11safe: config: no PIN source: set exactly one of PIN.File, PIN.Env and PIN.Prompt")
	case 1:
		return nil
	default:
		return errors.New("pkcs11safe: config: several PIN sources: set exactly one of PIN.File, PIN.Env and PIN.Prompt")
	}
}

// read returns the PIN. The caller wipes it.
func (p PINSource) read() (secret.Bytes, error) {
	var pin secret.Bytes
	switch {
	case p.File != "":
		b, err := readPINFile(p.File)
		if err != nil {
			return secret.Bytes{}, err
		}
		pin = secret.New(b)
		clear(b)
	case p.Env != "":
		v, ok := os.LookupEnv(p.Env)
		if !ok {
			return secret.Bytes{}, fmt.Errorf("pkcs11safe: PIN environment variable %s is not set", p.Env)
		}
		b := []byte(v)
		pin = secret.New(b)
		clear(b)
	case p.Prompt != nil:
		var err error
		if pin, err = p.Prompt(); err != nil {
			return secret.Bytes{}, fmt.Errorf("pkcs11safe: PIN prompt: %w", err)
		}
	default:
		return secret.Bytes{}, p.validate()
	}
	if pin.IsZero() {
		return secret.Bytes{}, errors.New("pkcs11safe: the PIN is empty")
	}
	return pin, nil
}

// readPINFile reads a PIN file, refusing one that others may read.
func readPINFile(path string) ([]byte, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("pkcs11safe: PIN file: %w", err)
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return nil, fmt.Errorf("pkcs11safe: PIN file: %w", err)
	}
	if !fi.Mode().IsRegular() {
		return nil, fmt.Errorf("pkcs11safe: PIN file %s is not a regular file", path)
	}
	if perm := fi.Mode().Perm(); perm&0o077 != 0 {
		return nil, fmt.Errorf("pkcs11safe: PIN file %s has mode %#o; it must not be accessible to group or others (chmod 600)", path, perm)
	}
	buf := make([]byte, maxPINFileSize+1)
	n, err := io.ReadFull(f, buf)
	if err != nil && !errors.Is(err, io.ErrUnexpectedEOF) && !errors.Is(err, io.EOF) {
		clear(buf)
		return nil, fmt.Errorf("pkcs11safe: reading PIN file %s: %w", path, err)
	}
	if n > maxPINFileSize {
		clear(buf)
		return nil, fmt.Errorf("pkcs11safe: PIN file %s is larger than %d bytes", path, maxPINFileSize)
	}
	b := buf[:n]
	switch {
	case len(b) >= 2 && b[len(b)-2] == '\r' && b[len(b)-1] == '\n':
		b = b[:len(b)-2]
	case len(b) >= 1 && b[len(b)-1] == '\n':
		b = b[:len(b)-1]
	}
	// Clear what lies past the PIN (the newline) so the caller only has to
	// clear the returned slice, which shares buf's array.
	clear(buf[len(b):])
	return b, nil
}
