package kms

import (
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"time"

	"github.com/cairnkms/cairn/internal/atomicfile"
	"github.com/cairnkms/cairn/kms/keystore"
)

// UsageFile is the name, in Config.StateDir, of the persisted usage history:
// per keyset version, counts and the last use, which the Safety check needs
// after a restart. It holds no key material.
const UsageFile = "usage.json"

// usageFileVersion is the format of UsageFile.
const usageFileVersion = 1

// maxUsageFile bounds what readUsageFile reads (a few versions of 100k
// keysets, as JSON).
const maxUsageFile = 256 << 20

type usageFile struct {
	Version int                    `json:"version"`
	SavedAt time.Time              `json:"saved_at"`
	Records []keystore.UsageRecord `json:"records"`
}

// readUsageFile reads the persisted usage history; nil if there is none.
func readUsageFile(dir string) ([]keystore.UsageRecord, error) {
	path := filepath.Join(dir, UsageFile)
	fi, err := os.Lstat(path)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	if !fi.Mode().IsRegular() || fi.Size() > maxUsageFile {
		return nil, fmt.Errorf("%s is not a regular file of at most %d bytes", path, maxUsageFile)
	}
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	var f usageFile
	if err := json.Unmarshal(data, &f); err != nil {
		return nil, fmt.Errorf("%s does not decode: %w", path, err)
	}
	if f.Version != usageFileVersion {
		return nil, fmt.Errorf("%s is format %d, this server reads %d", path, f.Version, usageFileVersion)
	}
	return f.Records, nil
}

// writeUsageFile replaces the persisted usage history atomically.
func writeUsageFile(dir string, records []keystore.UsageRecord, now time.Time) error {
	data, err := json.Marshal(usageFile{Version: usageFileVersion, SavedAt: now.UTC(), Records: records})
	if err != nil {
		return err
	}
	return atomicfile.Write(filepath.Join(dir, UsageFile), data, 0o600)
}
