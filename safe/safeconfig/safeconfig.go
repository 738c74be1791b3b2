// Package safeconfig opens a safe from its description: a small JSON file
// that an officer keeps next to the safe tool. Secrets (PINs, passphrases)
// never appear in it or on a command line: they come from a file, an
// environment variable, or a terminal prompt.
//
//	{"kind": "pkcs11", "module": "/usr/lib/softhsm/libsofthsm2.so",
//	 "token_label": "safe-1", "pin_file": "/run/secrets/safe-1.pin",
//	 "softhsm2_conf": "/var/lib/cairn/softhsm/softhsm2.conf"}
//	{"kind": "insecure-file", "label": "safe-4", "dir": "/var/lib/cairn/safe-4",
//	 "passphrase_env": "CAIRN_SAFE4_PASSPHRASE"}
package safeconfig

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"sync"

	"golang.org/x/term"

	"github.com/cairnkms/cairn/internal/secret"
	"github.com/cairnkms/cairn/safe"
	"github.com/cairnkms/cairn/safe/pkcs11safe"
)

// Config is one safe's description.
type Config struct {
	// Kind is "pkcs11" or "insecure-file".
	Kind string `json:"kind"`
	// PKCS#11: the module path, the token label, and the PIN source.
	Module     string `json:"module,omitempty"`
	TokenLabel string `json:"token_label,omitempty"`
	PINFile    string `json:"pin_file,omitempty"`
	PINEnv     string `json:"pin_env,omitempty"`
	// SoftHSM2Conf is the config file of a SoftHSM2 module (where its
	// tokens are): Open sets SOFTHSM2_CONF to it before the module is
	// loaded, so the safe opens with no environment set up. SoftHSM2 reads
	// it once per process: every safe a process opens must name the same
	// one (or none).
	SoftHSM2Conf string `json:"softhsm2_conf,omitempty"`
	// insecure-file: the safe's name and directory, and the passphrase source.
	Label          string `json:"label,omitempty"`
	Dir            string `json:"dir,omitempty"`
	PassphraseFile string `json:"passphrase_file,omitempty"`
	PassphraseEnv  string `json:"passphrase_env,omitempty"`
	// KDFMemoryKiB is argon2id's memory when creating a file safe (0: 64 MiB).
	KDFMemoryKiB uint32 `json:"kdf_memory_kib,omitempty"`
	// AttemptDir keeps the failed PIN/passphrase counter (default:
	// ~/.cairn/attempts).
	AttemptDir string `json:"attempt_dir,omitempty"`
}

// Load reads a description file. Relative paths inside it are resolved
// against the file's directory.
func Load(path string) (Config, error) {
	var c Config
	data, err := os.ReadFile(path)
	if err != nil {
		return c, fmt.Errorf("safeconfig: %w", err)
	}
	dec := json.NewDecoder(bytes.NewReader(data))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&c); err != nil {
		return c, fmt.Errorf("safeconfig: %s: %w", path, err)
	}
	// One JSON object and nothing after it: a file with more is not the
	// config its author thinks (a merge gone wrong, two configs pasted).
	if _, err := dec.Token(); err != io.EOF {
		return Config{}, fmt.Errorf("safeconfig: %s: data after the config object", path)
	}
	base := filepath.Dir(path)
	for _, p := range []*string{&c.PINFile, &c.Dir, &c.PassphraseFile, &c.AttemptDir, &c.SoftHSM2Conf} {
		if *p != "" && !filepath.IsAbs(*p) {
			*p = filepath.Join(base, *p)
		}
	}
	return c, c.validate(path)
}

func (c Config) validate(path string) error {
	switch c.Kind {
	case safe.KindPKCS11:
		if c.Module == "" || c.TokenLabel == "" {
			return fmt.Errorf("safeconfig: %s: a pkcs11 safe needs module and token_label", path)
		}
		if c.PINFile != "" && c.PINEnv != "" {
			return fmt.Errorf("safeconfig: %s: give pin_file or pin_env, not both", path)
		}
		if c.SoftHSM2Conf != "" {
			if fi, err := os.Stat(c.SoftHSM2Conf); err != nil || !fi.Mode().IsRegular() {
				return fmt.Errorf("safeconfig: %s: softhsm2_conf %s is not a readable file (%v)", path, c.SoftHSM2Conf, err)
			}
		}
	case safe.KindInsecureFile:
		if c.SoftHSM2Conf != "" {
			return fmt.Errorf("safeconfig: %s: softhsm2_conf is for pkcs11 safes", path)
		}
		if c.Label == "" || c.Dir == "" {
			return fmt.Errorf("safeconfig: %s: an insecure-file safe needs label and dir", path)
		}
		if c.PassphraseFile != "" && c.PassphraseEnv != "" {
			return fmt.Errorf("safeconfig: %s: give passphrase_file or passphrase_env, not both", path)
		}
	default:
		return fmt.Errorf("safeconfig: %s: kind %q, want %q or %q", path, c.Kind, safe.KindPKCS11, safe.KindInsecureFile)
	}
	return nil
}

func (c Config) attemptDir() (string, error) {
	if c.AttemptDir != "" {
		return c.AttemptDir, nil
	}
	home, err := os.UserHomeDir()
	if err != nil {
		return "", fmt.Errorf("safeconfig: no attempt_dir and no home directory: %w", err)
	}
	return filepath.Join(home, ".cairn", "attempts"), nil
}

// Open opens the safe the description names.
func Open(ctx context.Context, c Config) (safe.Safe, error) {
	dir, err := c.attemptDir()
	if err != nil {
		return nil, err
	}
	switch c.Kind {
	case safe.KindPKCS11:
		if err := useSoftHSM2Conf(c.SoftHSM2Conf); err != nil {
			return nil, err
		}
		pin := pkcs11safe.PINSource{File: c.PINFile, Env: c.PINEnv}
		if pin.File == "" && pin.Env == "" {
			pin.Prompt = Prompt(fmt.Sprintf("PIN for token %q: ", c.TokenLabel))
		}
		return pkcs11safe.Open(ctx, pkcs11safe.Config{Module: c.Module, TokenLabel: c.TokenLabel, PIN: pin, AttemptDir: dir})
	case safe.KindInsecureFile:
		pass, err := c.passphrase()
		if err != nil {
			return nil, err
		}
		defer pass.Wipe()
		return safe.OpenFileSafe(safe.FileSafeConfig{Dir: c.Dir, Label: c.Label, Passphrase: pass, KDFMemoryKiB: c.KDFMemoryKiB, AttemptDir: dir})
	}
	return nil, fmt.Errorf("safeconfig: unknown kind %q", c.Kind)
}

// softHSM2ConfEnv is the variable SoftHSM2 reads its config file from.
const softHSM2ConfEnv = "SOFTHSM2_CONF"

// softHSM2Conf is the softhsm2_conf the first pkcs11 safe that named one
// set in this process.
var softHSM2Conf struct {
	sync.Mutex
	path string
}

// useSoftHSM2Conf sets SOFTHSM2_CONF to conf ("" leaves the environment
// alone). SoftHSM2 reads it when the module is first loaded, so a second,
// different conf in one process is refused.
func useSoftHSM2Conf(conf string) error {
	if conf == "" {
		return nil
	}
	softHSM2Conf.Lock()
	defer softHSM2Conf.Unlock()
	if softHSM2Conf.path != "" && softHSM2Conf.path != conf {
		return fmt.Errorf("safeconfig: softhsm2_conf %s, but a safe opened before in this process uses %s (SoftHSM2 reads its config once per process): open safes of one SoftHSM2 config at a time", conf, softHSM2Conf.path)
	}
	if err := os.Setenv(softHSM2ConfEnv, conf); err != nil {
		return fmt.Errorf("safeconfig: setting %s: %w", softHSM2ConfEnv, err)
	}
	softHSM2Conf.path = conf
	return nil
}

// OpenFile loads a description and opens the safe.
func OpenFile(ctx context.Context, path string) (safe.Safe, error) {
	c, err := Load(path)
	if err != nil {
		return nil, err
	}
	s, err := Open(ctx, c)
	if err != nil {
		return nil, fmt.Errorf("safeconfig: opening %s: %w", path, err)
	}
	return s, nil
}

func (c Config) passphrase() (secret.Bytes, error) {
	switch {
	case c.PassphraseFile != "":
		fi, err := os.Stat(c.PassphraseFile)
		if err != nil {
			return secret.Bytes{}, fmt.Errorf("safeconfig: %w", err)
		}
		if fi.Mode().Perm()&0o077 != 0 {
			return secret.Bytes{}, fmt.Errorf("safeconfig: passphrase file %s has mode %v; chmod 600 it", c.PassphraseFile, fi.Mode().Perm())
		}
		b, err := os.ReadFile(c.PassphraseFile)
		if err != nil {
			return secret.Bytes{}, fmt.Errorf("safeconfig: %w", err)
		}
		defer clear(b)
		return secret.New(bytes.TrimRight(b, "\r\n")), nil
	case c.PassphraseEnv != "":
		v, ok := os.LookupEnv(c.PassphraseEnv)
		if !ok || v == "" {
			return secret.Bytes{}, fmt.Errorf("safeconfig: environment variable %s is not set", c.PassphraseEnv)
		}
		return secret.New([]byte(v)), nil
	}
	return Prompt(fmt.Sprintf("Passphrase for safe %q: ", c.Label))()
}

// Prompt returns a function that asks for a secret on the controlling
// terminal without echoing it.
func Prompt(question string) func() (secret.Bytes, error) {
	return func() (secret.Bytes, error) {
		tty, err := os.OpenFile("/dev/tty", os.O_RDWR, 0)
		if err != nil {
			return secret.Bytes{}, errors.New("safeconfig: no terminal to prompt on; configure a pin_file/pin_env or passphrase_file/passphrase_env")
		}
		defer tty.Close()
		fmt.Fprint(tty, question)
		b, err := term.ReadPassword(int(tty.Fd()))
		fmt.Fprintln(tty)
		if err != nil {
			return secret.Bytes{}, fmt.Errorf("safeconfig: reading from the terminal: %w", err)
		}
		defer clear(b)
		return secret.New(b), nil
	}
}
