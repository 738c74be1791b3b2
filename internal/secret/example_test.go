package secret_test

import (
	"crypto/hmac"
	"crypto/sha256"
	"fmt"
	"log/slog"
	"os"

	"github.com/cairnkms/cairn/internal/secret"
)

func Example() {
	key, err := secret.Random(32)
	if err != nil {
		fmt.Println(err)
		return
	}
	defer key.Wipe() // zeroes the key for every copy of the handle

	// Printing or logging a key never shows it.
	fmt.Println(key)
	fmt.Printf("%x\n", key)
	logger := slog.New(slog.NewTextHandler(os.Stdout, &slog.HandlerOptions{
		ReplaceAttr: func(_ []string, a slog.Attr) slog.Attr {
			if a.Key == slog.TimeKey {
				return slog.Attr{} // keep the example output stable
			}
			return a
		},
	}))
	logger.Info("loaded", "key", key)

	// Use the key through a short-lived copy and clear the copy afterwards.
	raw := key.Data()
	mac := hmac.New(sha256.New, raw)
	clear(raw)
	mac.Write([]byte("message"))
	fmt.Println(len(mac.Sum(nil)))

	// Output:
	// secret.Bytes(REDACTED)
	// secret.Bytes(REDACTED)
	// level=INFO msg=loaded key=secret.Bytes(REDACTED)
	// 32
}
