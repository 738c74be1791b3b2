package tests

import (
	"bytes"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/cairnkms/cairn/safe"
	"github.com/cairnkms/cairn/safe/safeconfig"
	"github.com/cairnkms/cairn/tests/framework"
)

// The helpers here gather, for World.RequireNoSecrets at the end of a
// chain's test, the secrets the test process can know besides the RMK, the
// shares and the safes' passphrases or PINs: every version of each region's
// key, the keys of every keyset copy a bundle of the test carried, and the
// plaintexts and tokens the test chose as sentinels.

// regionKeysOf fetches every version of each region's key from r, as the
// region's kms-1 would, for the secret scan. The caller clears them (the
// scan does, once they are secrets).
func regionKeysOf(t *testing.T, r *framework.Replica, regions ...string) map[string]regionKeys {
	t.Helper()
	out := map[string]regionKeys{}
	for _, region := range regions {
		mat, _, err := r.UnwrapRegionKey("kms/"+region+"/kms-1", region)
		if err != nil {
			t.Fatalf("UnwrapRegionKey(%s) from %s for the secret scan = %v", region, r.ID, err)
		}
		keys := regionKeys{}
		for _, v := range mat.GetVersions() {
			keys[v.GetVersion()] = v.GetKey()
		}
		if len(keys) == 0 {
			t.Fatalf("UnwrapRegionKey(%s) from %s: no key version to scan for", region, r.ID)
		}
		out[region] = keys
	}
	return out
}

// bundleSecrets opens every keyset copy of every bundle file (*.bundle)
// under dir with the region key version it is under and returns their keys
// for the scan (keysetSecrets: each key's serialized key data and the raw
// AES key), each once. A bundle of a region not in keys (a hand-made one
// for a mistyped region) holds no copy it could open: it must hold none.
func bundleSecrets(t *testing.T, dir string, keys map[string]regionKeys) []framework.Secret {
	t.Helper()
	var paths []string
	err := filepath.WalkDir(dir, func(path string, d fs.DirEntry, err error) error {
		if err == nil && d.Type().IsRegular() && strings.HasSuffix(path, ".bundle") {
			paths = append(paths, path)
		}
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	if len(paths) == 0 {
		t.Fatalf("no bundle under %s to take keyset keys from", dir)
	}
	var out []framework.Secret
	copies := 0
	for _, path := range paths {
		_, b := readBundleFile(t, path)
		for _, kc := range b.GetKeysets() {
			region := kc.GetKeyset().GetRegion()
			if keys[region] == nil {
				t.Fatalf("bundle %s holds a %s copy of %s, but the scan has no key of region %s", path, region, kc.GetName(), region)
			}
			for _, s := range copySecrets(t, kc.GetKeyset(), keys[region]) {
				s.Name = fmt.Sprintf("%s (%s copy)", s.Name, region)
				out = append(out, s)
			}
			copies++
		}
	}
	out = uniqueSecrets(out)
	t.Logf("secret scan: %d keyset keys from %d copies in %d bundles", len(out), copies, len(paths))
	return out
}

// chainSecrets is every region key version r serves for regions and every
// keyset key of the bundles under bundleDir, for the scan.
func chainSecrets(t *testing.T, r *framework.Replica, bundleDir string, regions ...string) []framework.Secret {
	t.Helper()
	keys := regionKeysOf(t, r, regions...)
	out := bundleSecrets(t, bundleDir, keys)
	return append(out, regionKeySecrets(t, keys)...)
}

// sentinel is a value the test chose (a plaintext, a token) that no file
// may hold.
func sentinel(name string, v []byte) framework.Secret {
	return framework.Secret{Name: name, Value: bytes.Clone(v)}
}

// unlockSecrets are the passphrases or PINs of safes that the scan's own
// safes do not cover (the old safes of a rekey), each anywhere but its own
// file.
func unlockSecrets(safes []framework.SafeConfig) []framework.Secret {
	var out []framework.Secret
	for _, s := range safes {
		out = append(out, framework.Secret{Name: s.Unlock.Name, Value: bytes.Clone(s.Unlock.Value), Home: s.Unlock.Home})
	}
	return out
}

// writeErrorStrings writes the error strings callers saw to a file of the
// world's directory, so that the scan reads them too (an error goes back to
// its caller, who may log it).
func writeErrorStrings(t *testing.T, w *framework.World, name string, errs []string) {
	t.Helper()
	if err := os.WriteFile(filepath.Join(w.Dir, name), []byte(strings.Join(errs, "\n")+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
}

// uniqueSecrets drops the secrets whose value an earlier one has (the
// same keyset key in every bundle of a region), keeping the first name.
func uniqueSecrets(in []framework.Secret) []framework.Secret {
	seen := map[string]bool{}
	out := slices.DeleteFunc(in, func(s framework.Secret) bool {
		dup := seen[string(s.Value)]
		seen[string(s.Value)] = true
		if dup {
			clear(s.Value) // its own copy: nothing else clears it
		}
		return dup
	})
	return out
}

// requireNoUpSecrets is World.RequireNoSecrets for a chain `cairn up`
// started, whose files no World wrote: it opens the chain's safes (the
// configs safes/safe-*.json of its state directory), recovers the RMK from
// the threshold of them with the chain's manifest (genesis.json), unseals
// every share, and scans the state directory and the roots (the launchers'
// and the commands' output) for them, raw or encoded, for each safe's
// passphrase or PIN (anywhere but its own file), and for the extra secrets.
// Run it once the chain is stopped. It clears the secrets' values when
// done. It opens the safes in this process: a chain's SoftHSM2 tokens open
// (their config carries softhsm2_conf) as long as no other safe of this
// process holds the PKCS#11 module, which is finalized when its last safe
// closes.
func requireNoUpSecrets(t *testing.T, state string, extra []framework.Secret, roots ...string) {
	t.Helper()
	m, err := safe.ReadManifest(filepath.Join(state, "genesis.json"))
	if err != nil {
		t.Fatalf("safe.ReadManifest = %v", err)
	}
	configs, err := filepath.Glob(filepath.Join(state, "safes", "safe-*.json"))
	if err != nil || len(configs) < int(m.GetThreshold()) {
		t.Fatalf("safe configs of %s: %v, %v; want at least the threshold, %d", state, configs, err, m.GetThreshold())
	}
	var safes []framework.SafeConfig
	for _, path := range configs {
		safes = append(safes, framework.SafeConfig{Path: path, Unlock: upUnlockSecret(t, path)})
	}
	framework.RequireNoKeyMaterial(t, m, safes, nil, extra, append([]string{state}, roots...)...)
}

// upUnlockSecret is what opens the safe of the `cairn up` config at path: a
// file safe's passphrase or a token's user PIN, with its file as home.
func upUnlockSecret(t *testing.T, path string) framework.Secret {
	t.Helper()
	cfg, err := safeconfig.Load(path)
	if err != nil {
		t.Fatal(err)
	}
	file, what := cfg.PassphraseFile, "passphrase of "+cfg.Label
	if file == "" {
		file, what = cfg.PINFile, "user PIN of "+cfg.TokenLabel
	}
	if file == "" {
		t.Fatalf("safe config %s names no passphrase or PIN file", path)
	}
	v, err := os.ReadFile(file)
	if err != nil {
		t.Fatal(err)
	}
	return framework.Secret{Name: what, Value: bytes.TrimSpace(v), Home: file}
}
