// Last line of defence against a blank screen: a render error shows what broke and a reload button.
import { Component, type ErrorInfo, type ReactNode } from "react";

interface State {
  error: Error | null;
}

export class ErrorBoundary extends Component<{ children: ReactNode }, State> {
  override state: State = { error: null };

  static getDerivedStateFromError(error: Error): State {
    return { error };
  }

  override componentDidCatch(error: Error, info: ErrorInfo): void {
    console.error("UI crashed", error, info.componentStack);
  }

  override render(): ReactNode {
    if (this.state.error === null) return this.props.children;
    return (
      <div className="banner banner-server crash" role="alert" data-testid="error-banner">
        <div className="banner-text">
          <strong className="banner-title">The page hit a bug and stopped drawing</strong>
          <span className="banner-detail mono">{this.state.error.message}</span>
        </div>
        <button type="button" onClick={() => window.location.reload()}>
          Reload
        </button>
      </div>
    );
  }
}
