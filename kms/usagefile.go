package kms

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/cairnkms/cairn/internal/atomicfile"
	"github.com/cairnkms/cairn/internal/keysets"
	"github.com/cairnkms/cairn/kms/keystore"
	bundlev1 "github.com/cairnkms/cairn/proto/cairn/bundle/v1"
	cryptov1 "github.com/cairnkms/cairn/proto/cairn/crypto/v1"
)

// UsageFile is the name, in Config.StateDir, of the persisted usage history:
// per keyset version, counts and the last use, which the Safety check needs
// after a restart. It holds no key material.
const UsageFile = "usage.tsv"

// maxUsageFile bounds what readUsageFile reads and writeUsageFile writes
// (a few versions of 100k keysets take about 10 MB).
const maxUsageFile = 256 << 20

// The file is text: a header line, then one line per record of seven
// tab-separated fields (keyset names hold no tab or newline):
//
//	cairn-kms-usage 1
//	<keyset> <key id> <1 if decrypting, else 0> <TTL ns> <encrypts> <decrypts> <last use, unix ns>
//
// Hand-written rather than JSON: a server of 100k keysets reads it at every
// boot and writes it every few seconds.
const usageHeader = "cairn-kms-usage 1\n"

// encodeUsage is the file's content for records.
func encodeUsage(records []keystore.UsageRecord) []byte {
	b := make([]byte, 0, len(usageHeader)+len(records)*64)
	b = append(b, usageHeader...)
	for _, r := range records {
		b = append(b, r.Keyset...)
		b = append(b, '\t')
		b = strconv.AppendUint(b, uint64(r.KeyID), 10)
		b = append(b, '\t')
		if r.Decrypting {
			b = append(b, '1')
		} else {
			b = append(b, '0')
		}
		b = append(b, '\t')
		b = strconv.AppendInt(b, int64(r.TTL), 10)
		b = append(b, '\t')
		b = strconv.AppendUint(b, r.EncryptCount, 10)
		b = append(b, '\t')
		b = strconv.AppendUint(b, r.DecryptCount, 10)
		b = append(b, '\t')
		var last int64 // 0: never
		if !r.LastUse.IsZero() {
			last = r.LastUse.UnixNano()
		}
		b = strconv.AppendInt(b, last, 10)
		b = append(b, '\n')
	}
	return b
}

// decodeUsage parses the file's content strictly.
func decodeUsage(data []byte) ([]keystore.UsageRecord, error) {
	rest, ok := bytes.CutPrefix(data, []byte(usageHeader))
	if !ok {
		return nil, fmt.Errorf("no %q header", strings.TrimSpace(usageHeader))
	}
	var out []keystore.UsageRecord
	for n := 2; len(rest) > 0; n++ {
		line, after, found := bytes.Cut(rest, []byte{'\n'})
		if !found {
			return nil, fmt.Errorf("line %d: incomplete", n)
		}
		rest = after
		f := strings.Split(string(line), "\t")
		if len(f) != 7 {
			return nil, fmt.Errorf("line %d: %d fields, want 7", n, len(f))
		}
		id, err1 := strconv.ParseUint(f[1], 10, 32)
		ttl, err2 := strconv.ParseInt(f[3], 10, 64)
		enc, err3 := strconv.ParseUint(f[4], 10, 64)
		dec, err4 := strconv.ParseUint(f[5], 10, 64)
		last, err5 := strconv.ParseInt(f[6], 10, 64)
		if err := errors.Join(err1, err2, err3, err4, err5); err != nil || (f[2] != "0" && f[2] != "1") {
			return nil, fmt.Errorf("line %d: malformed field (%v)", n, err)
		}
		r := keystore.UsageRecord{Keyset: f[0], KeyID: uint32(id), Decrypting: f[2] == "1", TTL: time.Duration(ttl),
			EncryptCount: enc, DecryptCount: dec}
		if last != 0 {
			r.LastUse = time.Unix(0, last).UTC()
		}
		out = append(out, r)
	}
	return out, nil
}

// errNoUsageFile is readUsageFile's answer when there is no file.
var errNoUsageFile = errors.New("no usage history file")

// readUsageFile reads and checks the persisted usage history. It refuses a
// symbolic link, anything but a regular file, a file over maxUsageFile, and
// a record no KMS would write (an empty keyset name, a negative TTL, a last
// use more than maxClockSkew after now). It returns errNoUsageFile if there
// is no file.
func readUsageFile(dir string, now time.Time) ([]keystore.UsageRecord, error) {
	path := filepath.Join(dir, UsageFile)
	f, err := os.OpenFile(path, os.O_RDONLY|syscall.O_NOFOLLOW, 0)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, errNoUsageFile
	}
	if err != nil {
		return nil, err
	}
	defer f.Close() // read-only
	fi, err := f.Stat()
	if err != nil {
		return nil, err
	}
	if !fi.Mode().IsRegular() || fi.Size() > maxUsageFile {
		return nil, fmt.Errorf("%s is not a regular file of at most %d bytes", path, maxUsageFile)
	}
	data, err := io.ReadAll(io.LimitReader(f, maxUsageFile+1))
	if err != nil {
		return nil, err
	}
	if len(data) > maxUsageFile {
		return nil, fmt.Errorf("%s grew past %d bytes while read", path, maxUsageFile)
	}
	records, err := decodeUsage(data)
	if err != nil {
		return nil, fmt.Errorf("%s does not decode: %w", path, err)
	}
	for i, r := range records {
		switch {
		case keysets.ValidName(r.Keyset) != nil:
			return nil, fmt.Errorf("%s: record %d names no valid keyset", path, i)
		case r.TTL < 0:
			return nil, fmt.Errorf("%s: record %d has a negative TTL", path, i)
		case r.LastUse.After(now.Add(maxClockSkew)):
			return nil, fmt.Errorf("%s: record %d was last used at %s, after now (%s)", path, i, r.LastUse.Format(time.RFC3339), now.Format(time.RFC3339))
		}
	}
	return records, nil
}

// maxClockSkew is how far in the future a persisted last use may be (the
// clock may have been stepped back since it was written).
const maxClockSkew = time.Hour

// setAsideUsageFile renames an unusable usage file out of the way, so that
// the next flush does not destroy it (an operator may want to look).
func setAsideUsageFile(dir string, now time.Time) (string, error) {
	aside := filepath.Join(dir, fmt.Sprintf("%s.unusable-%d", UsageFile, now.Unix()))
	return aside, os.Rename(filepath.Join(dir, UsageFile), aside)
}

// usageFromBundle is the history to assume when a server that served a
// bundle has lost its own: every version the bundle lists as decrypting,
// used now. It keeps the Safety check closed (no such version may leave the
// decrypt set before its TTL has passed) rather than open.
func usageFromBundle(b *bundlev1.Bundle, now time.Time) []keystore.UsageRecord {
	var out []keystore.UsageRecord
	for _, k := range b.GetKeysets() {
		for _, v := range k.GetKeyset().GetVersions() {
			switch v.GetStatus() {
			case cryptov1.KeyStatus_KEY_STATUS_PRIMARY, cryptov1.KeyStatus_KEY_STATUS_ENABLED:
				out = append(out, keystore.UsageRecord{Keyset: k.GetName(), KeyID: v.GetKeyId(), Decrypting: true,
					TTL: k.GetCiphertextTtl().AsDuration(), LastUse: now})
			}
		}
	}
	return out
}

// writeUsageFile replaces the persisted usage history atomically. It
// refuses to write a file readUsageFile would refuse for its size.
func writeUsageFile(dir string, records []keystore.UsageRecord) error {
	data := encodeUsage(records)
	if len(data) > maxUsageFile {
		return fmt.Errorf("the usage history is %d bytes, more than %d", len(data), maxUsageFile)
	}
	return atomicfile.Write(filepath.Join(dir, UsageFile), data, 0o600)
}
