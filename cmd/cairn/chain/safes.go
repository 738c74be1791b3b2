package chain

import (
	"context"
	"crypto/rand"
	"encoding/base64"
	"encoding/hex"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
)

// PKCS11ModuleEnv names the environment variable that says where the
// SoftHSM2 PKCS#11 library is (as for the tests' softhsmtest).
const PKCS11ModuleEnv = "CAIRN_PKCS11_MODULE"

// softhsmModulePaths are where Debian and Ubuntu install libsofthsm2.so.
var softhsmModulePaths = []string{
	"/usr/lib/softhsm/libsofthsm2.so",
	"/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
	"/usr/lib/aarch64-linux-gnu/softhsm/libsofthsm2.so",
}

// softHSM is an installed SoftHSM2: its PKCS#11 library and softhsm2-util.
type softHSM struct {
	module, util string
}

// findSoftHSM returns the installed SoftHSM2, or nil: the module from
// $CAIRN_PKCS11_MODULE or the usual paths, and softhsm2-util on PATH.
func findSoftHSM() *softHSM {
	util, err := exec.LookPath("softhsm2-util")
	if err != nil {
		return nil
	}
	paths := softhsmModulePaths
	if p := os.Getenv(PKCS11ModuleEnv); p != "" {
		paths = []string{p}
	}
	for _, p := range paths {
		if _, err := os.Stat(p); err == nil {
			return &softHSM{module: p, util: util}
		}
	}
	return nil
}

// safeEnv is the environment of every `safe` command: SoftHSM2 reads its
// token directory from SOFTHSM2_CONF, which is private to the state dir.
// The safe configs name it too (softhsm2_conf); the variable serves the
// configs of state dirs made before they did.
func (c *Chain) safeEnv() []string {
	if c.s.Safes != SafesSoftHSM {
		return nil
	}
	return []string{"SOFTHSM2_CONF=" + filepath.Join(c.layout.softhsm(), "softhsm2.conf")}
}

// randomSecret returns n random bytes, printable (URL-safe base64, no
// padding), for passphrases and PINs.
func randomSecret(n int) (string, error) {
	b := make([]byte, n)
	if _, err := rand.Read(b); err != nil {
		return "", fmt.Errorf("chain: %w", err)
	}
	defer clear(b)
	return base64.RawURLEncoding.EncodeToString(b), nil
}

// writeSecretFile writes a secret followed by a newline to a new file with
// mode 0600; it never overwrites one.
func writeSecretFile(path, secret string) error {
	f, err := os.OpenFile(path, os.O_CREATE|os.O_EXCL|os.O_WRONLY, 0o600)
	if err != nil {
		return fmt.Errorf("chain: %w", err)
	}
	if _, err := f.WriteString(secret + "\n"); err != nil {
		f.Close()
		return fmt.Errorf("chain: writing %s: %w", path, err)
	}
	if err := f.Chmod(0o600); err != nil { // exact, whatever the umask
		f.Close()
		return fmt.Errorf("chain: %w", err)
	}
	if err := f.Close(); err != nil {
		return fmt.Errorf("chain: writing %s: %w", path, err)
	}
	return nil
}

// makeFileSafes writes the configs of numSafes insecure file safes with
// random passphrases in 0600 files. The safes themselves are created by
// `safe genesis`.
func (c *Chain) makeFileSafes() (string, error) {
	dir := c.layout.safes()
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return "", fmt.Errorf("chain: %w", err)
	}
	for i := 1; i <= numSafes; i++ {
		label := fmt.Sprintf("safe-%d", i)
		pass, err := randomSecret(32)
		if err != nil {
			return "", err
		}
		passPath := filepath.Join(dir, label+".passphrase")
		if err := writeSecretFile(passPath, pass); err != nil {
			return "", err
		}
		cfg := map[string]any{
			"kind": "insecure-file", "label": label, "dir": filepath.Join(dir, label),
			"passphrase_file": passPath, "attempt_dir": filepath.Join(dir, "attempts"),
		}
		if err := writeJSONFile(c.layout.safeConfig(i), cfg, 0o600); err != nil {
			return "", err
		}
	}
	return fmt.Sprintf("configs and 0600 passphrase files in %s", c.display(dir)), nil
}

// makeSoftHSMSafes makes a SoftHSM2 token directory and softhsm2.conf
// private to the state dir, initializes one token per safe with random PINs
// (user PIN and SO PIN in 0600 files), and writes a pkcs11 safe config per
// token that names the softhsm2.conf (safeconfig's softhsm2_conf).
func (c *Chain) makeSoftHSMSafes(ctx context.Context) (string, error) {
	hsmDir := c.layout.softhsm()
	tokens := filepath.Join(hsmDir, "tokens")
	if err := os.MkdirAll(tokens, 0o700); err != nil {
		return "", fmt.Errorf("chain: %w", err)
	}
	conf := filepath.Join(hsmDir, "softhsm2.conf")
	text := fmt.Sprintf("directories.tokendir = %s\nobjectstore.backend = file\nlog.level = ERROR\nslots.removable = false\n", tokens)
	if err := os.WriteFile(conf, []byte(text), 0o600); err != nil {
		return "", fmt.Errorf("chain: %w", err)
	}
	dir := c.layout.safes()
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return "", fmt.Errorf("chain: %w", err)
	}
	for i := 1; i <= numSafes; i++ {
		label := fmt.Sprintf("safe-%d", i)
		userPIN, err := randomPIN()
		if err != nil {
			return "", err
		}
		soPIN, err := randomPIN()
		if err != nil {
			return "", err
		}
		pinPath := filepath.Join(dir, label+".pin")
		if err := writeSecretFile(pinPath, userPIN); err != nil {
			return "", err
		}
		if err := writeSecretFile(filepath.Join(dir, label+".so-pin"), soPIN); err != nil {
			return "", err
		}
		// softhsm2-util takes the PINs only as arguments; these are
		// development tokens private to this state dir.
		if _, err := c.run(ctx, "softhsm2-util-"+label, c.hsm.util,
			[]string{"--init-token", "--free", "--label", label, "--so-pin", soPIN, "--pin", userPIN}, "SOFTHSM2_CONF="+conf); err != nil {
			return "", err
		}
		// softhsm2_conf: `safe` sets SOFTHSM2_CONF from it, so an officer
		// runs bin/safe on this config by hand, with no environment.
		cfg := map[string]any{
			"kind": "pkcs11", "module": c.hsm.module, "token_label": label, "pin_file": pinPath,
			"softhsm2_conf": conf, "attempt_dir": filepath.Join(dir, "attempts"),
		}
		if err := writeJSONFile(c.layout.safeConfig(i), cfg, 0o600); err != nil {
			return "", err
		}
	}
	return fmt.Sprintf("tokens in %s, PINs in 0600 files in %s", c.display(tokens), c.display(dir)), nil
}

// randomPIN returns a random 16-digit-hex PIN (SoftHSM2 takes 4 to 255
// characters).
func randomPIN() (string, error) {
	b := make([]byte, 8)
	if _, err := rand.Read(b); err != nil {
		return "", fmt.Errorf("chain: %w", err)
	}
	defer clear(b)
	return hex.EncodeToString(b), nil
}

// safesLabel says what the safes are, for progress lines.
func safesLabel(k SafesKind) string {
	if k == SafesSoftHSM {
		return "SoftHSM2 tokens"
	}
	return "insecure file safes"
}
